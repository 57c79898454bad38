#!/usr/bin/env python
"""Fine-tune any causal LM through fastattn (accelerate-native). See `hf_fastattn/finetune.py` for the options.

    accelerate launch scripts/finetune.py --model PATH --method poly --local-window 64 --data train.txt --bf16
    torchrun --nproc_per_node 2 scripts/finetune.py --steps 20          # 2 CPU processes (gloo)
    python scripts/finetune.py --steps 20 --save-every 10 --resume auto  # one process, resumable
"""

import sys

from hf_fastattn.finetune import main

if __name__ == "__main__":
    sys.exit(main())
