"""Forward helpers: ``full_logits`` gathers [batch, seq, vocab] logits on every rank for any layout."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _check_position_ids(position_ids: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    default = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    if position_ids is None:
        return default
    if not torch.equal(position_ids.to(default), default):
        raise ValueError("position_ids other than 0..seq-1 per row are not supported (rotary positions come from "
                         "the sequence index); for several documents per row use packed sequences (cu_seqlens)")
    return position_ids


def model_forward(model, input_ids: torch.Tensor, *, position_ids=None, labels=None, loss_mask=None,
                  packed_seq_params=None, runtime_gather_output: bool = True):
    """One call of ``model`` (a single pipeline stage holding the whole model).

    input_ids [B, S] int64 -> logits [B, S, V] (gathered over TP when ``runtime_gather_output``), or the
    per-token loss [B, S] fp32 when ``labels`` are given (MTP loss, if any, is added to the gradient by
    megatron-core's MTP loss auto-scaler).
    """
    position_ids = _check_position_ids(position_ids, input_ids)
    return model(input_ids, position_ids, None, labels=labels, loss_mask=loss_mask,
                 packed_seq_params=packed_seq_params, runtime_gather_output=runtime_gather_output)


class _CaptureMTP:
    """Forward hook keeping the MTP block's output ([(1 + n_mtp) * S, B, H], main states first)."""

    def __init__(self, model):
        self.output = None
        self.handle = model.mtp.register_forward_hook(self) if getattr(model, "mtp_process", False) else None

    def __call__(self, module, args, output):
        self.output = output

    def logits(self, model) -> list[torch.Tensor]:
        if self.handle is None:
            return []
        self.handle.remove()
        chunks = torch.chunk(self.output, 1 + model.config.mtp_num_layers, dim=0)[1:]
        out = []
        for h in chunks:
            logits, _ = model.output_layer(h, weight=model.shared_embedding_or_output_weight()
                                           if model.share_embeddings_and_output_weights else None,
                                           runtime_gather_output=True)
            out.append(logits.transpose(0, 1).contiguous())
        return out


@torch.no_grad()
def full_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                packed_seq_params=None, with_mtp: bool = False):
    """Logits [batch, seq, vocab] (fp32 or the model dtype) on every rank, whatever the TP/PP/EP sizes.

    ``model`` is this rank's model chunk from :func:`build_model`. Under pipeline parallelism the
    hidden states travel stage to stage (point-to-point) and the last stage's logits are broadcast to
    every rank of the pipeline group. With ``with_mtp``, returns ``(logits, [mtp_logits per MTP
    layer])``; MTP layer k at position t predicts token t + 2 + k.
    """
    if with_mtp:
        return _full_logits_with_mtp(model, input_ids, position_ids, packed_seq_params)
    return _full_logits(model, input_ids, position_ids, packed_seq_params)


def _full_logits_with_mtp(model, input_ids, position_ids, packed_seq_params):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("full_logits(with_mtp=True) supports pipeline_parallel=1 only")
    capture = _CaptureMTP(model)
    try:
        logits = _full_logits(model, input_ids, position_ids, packed_seq_params)
        return logits, capture.logits(model)
    finally:
        if capture.handle is not None:
            capture.handle.remove()


def _full_logits(model, input_ids, position_ids=None, packed_seq_params=None):
    from megatron.core import parallel_state as ps

    was_training = model.training
    model.eval()
    try:
        input_ids = input_ids.to(next(model.parameters()).device)
        position_ids = _check_position_ids(position_ids, input_ids)
        pp = ps.get_pipeline_model_parallel_world_size()
        if pp == 1:
            return model_forward(model, input_ids, position_ids=position_ids, packed_seq_params=packed_seq_params)
        cfg = model.config
        B, S = input_ids.shape
        tp = ps.get_tensor_model_parallel_world_size()
        seq = S // tp if cfg.sequence_parallel else S
        hidden_shape = (seq, B, cfg.hidden_size)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        if not first:
            recv = torch.empty(hidden_shape, dtype=cfg.params_dtype, device=input_ids.device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(input_ids, position_ids, None, packed_seq_params=packed_seq_params, runtime_gather_output=True)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = torch.empty((B, S, model.qwen3_next_config.vocab_size), dtype=cfg.params_dtype,
                              device=input_ids.device)
        group = ps.get_pipeline_model_parallel_group()
        src = dist.get_global_rank(group, pp - 1)
        out = out.contiguous()
        dist.broadcast(out, src=src, group=group)
        return out
    finally:
        model.train(was_training)
