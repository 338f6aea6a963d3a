"""``python llamafactory_driver.py plain|lorapro CONFIG.yaml [key=value ...]``: a LLaMA-Factory run
through its Python entry point (the only one that takes callbacks) with the capture callback,
either plain (LLaMA-Factory's ``run_exp``) or with LoRA-Pro (lorapro's ``run_exp``)."""

import sys

from capture import CaptureFirstStep

if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode == "plain":
        from llamafactory.train.tuner import run_exp
    else:
        from lorapro.integrations.llamafactory import run_exp
    run_exp(callbacks=[CaptureFirstStep()])
