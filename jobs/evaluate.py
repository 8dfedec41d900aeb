"""`ray job submit` entry point for evaluation; the same arguments as `synthalign evaluate`:

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/eval_paper.yaml \
        --model s3://bucket/run-dpo/merged --base llava-hf/llava-1.5-7b-hf --benchmarks pope,chair,mmhal,amber \
        --output s3://bucket/run-eval
"""

import sys

from synthalign_ray.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["evaluate"]
    main()
