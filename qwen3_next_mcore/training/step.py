"""One forward/backward pass over micro-batches through megatron-core's pipeline schedules.

A micro-batch is a dict: ``tokens`` [B, S] int64, ``labels`` [B, S] int64 (already shifted: the target
after tokens[t]), ``loss_mask`` [B, S] float, optional ``position_ids`` and ``packed_seq_params``.
The language-model loss is the masked mean over tokens of each micro-batch, averaged over
micro-batches; megatron-core adds the MTP and MoE auxiliary losses through its loss auto-scalers.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(per-token loss [B, S]) -> (masked loss sum, token count, {'lm loss': [sum, count]})."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.to(total.dtype)])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids.to(device), None, labels=batch["labels"].to(device),
                   loss_mask=batch["loss_mask"].to(device), packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(lm_loss_func, batch["loss_mask"].to(device))


def forward_backward(model, micro_batches: Iterable[dict], *, forward_only: bool = False,
                     loss_on_device: bool = False) -> dict:
    """Run megatron-core's schedule (no pipelining, or 1F1B under pipeline parallelism) over
    ``micro_batches`` (a list of dicts as in the module docstring). Gradients accumulate in
    ``param.grad`` (or ``main_grad`` under megatron's DDP). Returns {'lm loss': mean} on the last
    pipeline stage, {} elsewhere: a float, or with ``loss_on_device`` a 0-d fp32 tensor on the loss's
    device (reading it as a float waits for the GPU; the training step reads it after issuing the
    optimizer step, so the GPU never idles there)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    batches = list(micro_batches)
    tokens = batches[0]["tokens"]
    fb = get_forward_backward_func()
    out = fb(forward_step_func=_forward_step, data_iterator=iter(batches), model=chunks,
             num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
             forward_only=forward_only)
    if not out:
        return {}
    # the objective: the mean over micro-batches of each micro-batch's token-mean loss
    means = [o["lm loss"][0] / o["lm loss"][1].clamp(min=1) for o in out]
    mean = torch.stack(means).mean()
    return {"lm loss": mean if loss_on_device else mean.item()}
