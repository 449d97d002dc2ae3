"""Engine benchmark: cbkernels against transformers' generate_batch and sequential generate()
on the embedded SmolLM2, in one run. Same as `cbkernels bench peers`.

    python bench/bench_engine.py [--prompts 16] [--max-new-tokens 32] [--out DIR]
"""
import sys

from cbkernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "peers", *sys.argv[1:]]))
