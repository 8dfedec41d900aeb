"""`ray job submit` entry point for generation; the same arguments as `synthalign generate`:

    ray job submit --working-dir . -- python jobs/generate.py --config configs/tiny.yaml --output s3://bucket/run
"""

import sys

from synthalign_ray.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["generate"]
    main()
