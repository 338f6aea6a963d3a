"""lorapro in the training tools people already use, without forking any of them.

Submodules (each imported on demand, so that ``import lorapro`` pulls in none of them):

- :mod:`lorapro.integrations.trainer`: ``LoRAProTrainer`` and a factory for the stock
  ``transformers.Trainer``;
- :mod:`lorapro.integrations.fsdp`: LoRA-Pro on FSDP2 (``fully_shard``) sharded LoRA factors,
  with the closed form's r x r Gram terms all-reduced from local shards;
- :mod:`lorapro.integrations.deepspeed`: which DeepSpeed ZeRO stages can carry a lorapro
  client optimizer, and a clear error for those that cannot.

Accelerate and torchrun/DDP need no integration code: see ``docs/integrations.md``.
"""
