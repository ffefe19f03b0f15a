"""What `lowtune quantize` accepts (lowtune.commands runs it with lowtune.quantize_model)."""
from __future__ import annotations

import argparse

from .paths import check_model_path, check_output_file

DESCRIPTION = """Quantize a model (GGUF file, a split GGUF from its first part, or Hugging Face safetensors
directory) to a llama.cpp recipe or the papers' INTb-gG, one tensor at a time, into a GGUF file
llama.cpp loads.

examples:
  lowtune quantize SmolLM2.Q4_1.gguf --type F32 -o teacher.gguf          # a float teacher
  lowtune quantize SmolLM2.Q4_1.gguf --type INT2-g32 -o student.gguf     # an INT2.1-style student
  lowtune quantize Llama-3.2-1B/ --type Q4_K_M -o llama-q4km.gguf        # HF safetensors -> GGUF

Recipes choose each tensor's type as llama-quantize does (Q4_K_M: Q4_K, Q6_K for the head and some
attn_v/ffn_down); INTb-gG types every decoder linear and keeps token_embd and output in F16, stored
as Q4_1/Q5_1 (b <= 5) or F32 (b = 6, 8) blocks that hold it exactly. Rows a block does not divide
fall back as llama-quantize does (Q4_K -> Q5_0, ...; the 256-wide I-quants -> IQ4_NL).

I-quants: IQ4_XS, IQ4_NL, IQ3_S and IQ3_XXS are written as llama.cpp writes them without an
importance matrix, and the recipes IQ4_XS, IQ4_NL, IQ3_M, IQ3_S, IQ3_XS with llama-quantize's
per-tensor choices. IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M (and the recipes built on them: IQ2_M,
IQ3_XXS, ...) need an importance matrix, which lowtune does not compute: they are refused with the
types to use instead. Files in every I-quant type, made by llama.cpp, are read, trained on and
evaluated.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("--type", required=True, dest="qtype",
                   help="llama.cpp recipe (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M "
                   "Q4_K_M Q5_K_M Q6_K IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS TQ2_0 Q2_0 ...) or INTb-gG (e.g. INT2-g32, "
                   "INT3-g64)")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.add_argument("--pure", action="store_true",
                   help="every 2-D weight gets --type (no recipe mixture), as llama-quantize --pure")
    p.add_argument("--output-type", help="type of the LM head (output.weight, or a tied token_embd)")
    p.add_argument("--token-embedding-type", help="type of token_embd.weight")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor lines")


def check(args: argparse.Namespace) -> None:
    check_model_path(args.source)
    check_output_file(args.output)
