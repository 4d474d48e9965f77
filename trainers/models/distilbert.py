"""DistilBERT (Sanh et al., 2019, "DistilBERT, a distilled version of BERT").

A post-LayerNorm bidirectional encoder (BERT, Devlin et al., 2019, with 6 layers and
no token-type embeddings or pooler):

    x_0 = LayerNorm(word_embeddings[idx] + position_embeddings[0..T-1])
    x   = sa_layer_norm(x + attention(x))         self-attention over real tokens only
    x   = output_layer_norm(x + lin2(GELU(lin1(x))))

Heads: sequence classification reads the first ([CLS]) position,
`classifier(dropout(ReLU(pre_classifier(h_0))))`; extractive QA maps every position
to a (start, end) pair of logits with `qa_outputs`. Module names copy the Hugging
Face checkpoint (`distilbert.transformer.layer.0.attention.q_lin`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainers.models.common import IGNORE_INDEX, attention_mask_4d, span_loss


@dataclass
class DistilBertConfig:
    vocab_size: int = 30522  # bert-base-uncased WordPiece vocabulary
    max_position_embeddings: int = 512  # longest input
    dim: int = 768  # model width C
    n_layers: int = 6  # transformer blocks (half of BERT-base)
    n_heads: int = 12  # attention heads
    hidden_dim: int = 3072  # FFN width (4C)
    dropout: float = 0.1  # embeddings, FFN output and QA head dropout (HF default)
    attention_dropout: float = 0.1  # dropout on attention probabilities
    seq_classif_dropout: float = 0.2  # dropout before `classifier`
    layer_norm_eps: float = 1e-12  # as in BERT
    num_labels: int = 2  # classes of the sequence-classification head
    pad_token_id: int = 0  # [PAD]; used for the padding mask when none is given
    gradient_checkpointing: bool = False  # recompute each block in backward to save activation memory

    @classmethod
    def tiny(cls, **overrides) -> "DistilBertConfig":
        """A few-thousand-parameter model for tests (dropout off so runs are deterministic)."""
        return cls(**{**dict(vocab_size=101, max_position_embeddings=32, dim=16, n_layers=2, n_heads=2,
                             hidden_dim=32, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0),
                      **overrides})


class MultiHeadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(hs) + padding mask) V per head; separate q/k/v projections."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        assert config.dim % config.n_heads == 0, "dim must be a multiple of n_heads"
        self.n_heads = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = config.attention_dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.size()
        q = self.q_lin(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_lin(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_lin(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.out_lin(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class FFN(nn.Module):
    """lin2(GELU(lin1(x))), hidden width hidden_dim."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.lin2(F.gelu(self.lin1(x))))  # (B, T, C); exact (erf) GELU as in BERT


class TransformerBlock(nn.Module):
    """sa_layer_norm(x + attention(x)), then output_layer_norm(x + ffn(x)) (post-LN)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.sa_layer_norm(x + self.attention(x, mask))  # post-LN
        return self.output_layer_norm(x + self.ffn(x))


class Embeddings(nn.Module):
    """LayerNorm(word_embeddings[idx] + position_embeddings[t]); no token types in DistilBERT."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))


class Transformer(nn.Module):
    """The stack of blocks, each optionally recomputed in backward (gradient checkpointing)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for block in self.layer:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


class DistilBertModel(nn.Module):
    """The encoder: token ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        T = input_ids.size(1)
        if T > self.config.max_position_embeddings:
            raise ValueError(f"DistilBERT: sequence of length {T} is longer than "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        mask = attention_mask_4d(attention_mask, T, causal=False)  # (B, 1, T, T) or None
        return self.transformer(self.embeddings(input_ids), mask)  # (B, T, C)


def _init_weights(model: nn.Module) -> None:
    """BERT init: N(0, 0.02) for Linear and Embedding, zero biases, the padding row zero."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class DistilBertForSequenceClassification(nn.Module):
    """Classifier over the [CLS] position: logits (B, num_labels)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        _init_weights(self)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """targets (B,) class ids."""
        h = self.distilbert(input_ids, attention_mask)[:, 0]  # (B, C) the [CLS] position
        logits = self.classifier(self.dropout(F.relu(self.pre_classifier(h))))  # (B, num_labels)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
        return logits, loss


class DistilBertForQuestionAnswering(nn.Module):
    """Extractive QA span head: logits (B, T, 2), [..., 0] = start, [..., 1] = end.

    targets (B, 2) hold the (start, end) token positions of the answer; a position
    outside [0, T) (e.g. -100 for "answer not in this window") is ignored. The loss is
    the mean of the start and end cross-entropies over positions (Devlin et al., 2019, §4.2).
    """

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.qa_outputs = nn.Linear(config.dim, 2)
        _init_weights(self)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.dropout(self.distilbert(input_ids, attention_mask))  # (B, T, C)
        logits = self.qa_outputs(h)  # (B, T, 2)
        loss = span_loss(logits, targets) if targets is not None else None
        return logits, loss
