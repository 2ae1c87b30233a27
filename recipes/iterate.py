"""Run the whole PSR loop from a YAML recipe; resumes a killed run where it stopped. The same as
``psr iterate`` (every flag of it works here too):

    python recipes/iterate.py --config recipes/smollm2/iterate/config_demo.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/iterate.py \\
        --config recipes/qwen2.5-math-7b/iterate/config_psr.yaml
"""

import sys

from psr.cli import main

if __name__ == "__main__":
    sys.exit(main(["iterate", *sys.argv[1:]]))
