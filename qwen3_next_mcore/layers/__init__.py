"""nn.Modules of Qwen3-Next built on megatron-core: norms, the Gated DeltaNet mixer, core attention, stack."""
