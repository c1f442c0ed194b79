#!/usr/bin/env python3
"""Export a megarlhf (megatron-core distributed) checkpoint to Hugging Face format.

Run with --help for the options; see megarlhf/convert/megatron_to_hf.py for the details.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarlhf.convert.megatron_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
