"""`multitune` with Accelerate's FSDP2 path on CPU processes (gloo), for tests/test_fsdp.py.

Accelerate turns FSDP on only for accelerator devices: on CPU its state stays MULTI_CPU and the
FSDP settings of the launch are ignored. torch's FSDP2 itself runs on CPU with gloo, so this
script makes Accelerate's state take the FSDP plugin it was given, and everything after that
(`prepare` sharding the model with `fully_shard`, the optimizer switched to the sharded
parameters, gradient clipping) is Accelerate's and multitune's own code.

    fsdp_on_cpu.py train CONFIG [--resume]     as `python -m multitune`
    fsdp_on_cpu.py stop-after N CONFIG        train to step N and leave a checkpoint
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

if sys.argv[1] == "stop-after":  # stop-after N CONFIG: train to step N, leave a checkpoint
    from multitune.config import load_config
    from multitune.training.loop import train

    train(load_config(sys.argv[3]), stop_after=int(sys.argv[2]))
else:
    from multitune.cli import main

    sys.exit(main())
