"""Who gets which rank (and which bit width): budgets, Hutchinson sensitivity, EMA curvature,
the rank controller, AdaLoRA, mixed precision. Depends on torch and `lora`."""
from allocation.adalora import AdaLoRAAllocator, AdaLoRAConfig, budget_schedule, orthogonal_regularizer
from allocation.allocator import NeverSteppedError, NullAllocator
from allocation.budget import (adapter_params, base_bits_per_param, base_bytes, cost_per_rank, fixed_params,
                               ranks_from_scores, training_bytes)
from allocation.controller import (ControllerConfig, CurvatureRankAllocator, RankController,
                                   resize_with_state)
from allocation.curvature import EMA, CurvatureTracker
from allocation.precision import choose_precision, plan_rank_and_precision, total_base_bytes
from allocation.sparsity import SparsityAllocator
from allocation.hutchinson import (TraceEstimate, hessian_traces, hutchinson_traces, module_shapes,
                                   sensitivity_ranks)
