#!/usr/bin/env python3
"""TensorRT-LLM-style entry point: `python convert_checkpoint.py --model_dir M --output_dir O --tp_size 8`."""

from moe_convert.cli import convert_checkpoint_main

if __name__ == "__main__":
    convert_checkpoint_main()
