"""The benchmark (`python -m trainers.bench`): speed, memory and scaling, each as a ratio of two
things timed side by side in one process. Sections: layers, quant, train_step, inference,
alloc, scaling, multi_adapter (one module each); timing.py holds the interleaved timer and the table."""
