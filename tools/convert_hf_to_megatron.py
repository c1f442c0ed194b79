#!/usr/bin/env python3
"""Convert a Hugging Face Llama checkpoint to a megatron-core distributed checkpoint.

Run with --help for the options; see megarlhf/convert/hf_to_megatron.py for the details.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarlhf.convert.hf_to_megatron import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
