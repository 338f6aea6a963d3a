"""lorapro in the training tools people already use, without forking any of them.

Submodules (each imported on demand, so that ``import lorapro`` pulls in none of them):

- :mod:`lorapro.integrations.trainer`: ``LoRAProTrainer`` and a factory for the stock
  ``transformers.Trainer``;
- :mod:`lorapro.integrations.fsdp`: helpers for FSDP2 (``fully_shard``): a placement of the
  LoRA A factors by columns, so that the optimizers communicate only r x r terms, and
  ``full_state`` (the optimizers themselves handle DTensor factors);
- :mod:`lorapro.integrations.deepspeed`: which DeepSpeed ZeRO stages can carry a lorapro
  client optimizer, and a clear error for those that cannot;
- :mod:`lorapro.integrations.llamafactory`, :mod:`lorapro.integrations.swift`,
  :mod:`lorapro.integrations.axolotl`: LoRA-Pro from each framework's own configuration (the
  ``lorapro-llamafactory`` and ``lorapro-swift`` commands, axolotl's ``plugins:`` list).

Accelerate and torchrun/DDP need no integration code: see ``docs/integrations.md``.
"""
