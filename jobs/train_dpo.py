"""`ray job submit` entry point for DPO training; the same arguments as `synthalign train`:

    ray job submit --working-dir . -- python jobs/train_dpo.py --config configs/train_paper.yaml \
        --data s3://bucket/run --output s3://bucket/run-dpo
"""

import sys

from synthalign_ray.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["train"]
    main()
