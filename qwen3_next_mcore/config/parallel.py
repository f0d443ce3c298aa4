"""Parallel layout: a frozen pydantic model, and its checks against a model config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, PositiveInt

from .model import Qwen3NextConfig


class ParallelConfig(BaseModel):
    """Sizes of the parallel dimensions (megatron-core's meaning for each)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensor_parallel: PositiveInt = 1
    pipeline_parallel: PositiveInt = 1
    expert_parallel: PositiveInt = 1
    expert_tensor_parallel: PositiveInt = 1
    context_parallel: PositiveInt = 1
    sequence_parallel: bool = False

    def check(self, config: Qwen3NextConfig) -> None:
        """Raise ValueError naming the field and the values when ``config`` cannot be split so."""
        tp, ep, pp = self.tensor_parallel, self.expert_parallel, self.pipeline_parallel
        rules = [
            ("num_attention_heads", config.num_attention_heads, tp, "tensor_parallel"),
            ("num_key_value_heads", config.num_key_value_heads, tp, "tensor_parallel"),
            ("linear_num_key_heads", config.linear_num_key_heads, tp, "tensor_parallel"),
            ("num_experts", config.num_experts, ep, "expert_parallel"),
            ("moe_intermediate_size", config.moe_intermediate_size, self.expert_tensor_parallel,
             "expert_tensor_parallel"),
            ("shared_expert_intermediate_size", config.shared_expert_intermediate_size, tp, "tensor_parallel"),
            ("num_hidden_layers", config.num_hidden_layers, pp, "pipeline_parallel"),
        ]
        for field, value, size, size_name in rules:
            if value % size:
                raise ValueError(
                    f"Qwen3NextConfig.{field}={value} is not divisible by {size_name}={size}"
                )
        if self.sequence_parallel and tp == 1:
            raise ValueError("ParallelConfig.sequence_parallel=True needs tensor_parallel > 1")

    def megatron_sizes(self) -> dict[str, int]:
        """The sizes under megatron-core's names (``initialize_model_parallel``, ``TransformerConfig`` and
        Megatron-LM's ``args`` share them)."""
        return {"tensor_model_parallel_size": self.tensor_parallel,
                "pipeline_model_parallel_size": self.pipeline_parallel,
                "expert_model_parallel_size": self.expert_parallel,
                "expert_tensor_parallel_size": self.expert_tensor_parallel,
                "context_parallel_size": self.context_parallel}

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel
