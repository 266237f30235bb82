import sys

from llmkit.cli import main

code = main()
if "torch.distributed" in sys.modules:  # torchrun -m llmkit ...: leave the process group before exiting
    from llmkit.train.distributed import teardown

    teardown()
sys.exit(code)
