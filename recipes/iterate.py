"""Run the whole PSR loop from a YAML recipe; resumes a killed run where it stopped.

    python recipes/iterate.py --config recipes/demo.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/iterate.py --config recipes/qwen2.5-math-7b/psr.yaml
"""

import sys

from psr.rounds import main

if __name__ == "__main__":
    sys.exit(main())
