#!/usr/bin/env bash
# GPU check (issue 14): pretraining MFU of GPT-2-124M (bf16 autocast + torch.compile + fused AdamW),
# batch-1 and batch-8 decode tokens/s on the GPU, and a serving load run. Prints one JSON line per part.
# Exits 2 with a one-line reason when CUDA is absent. Run from the repository root:
#     PYTHONPATH=$PWD/src bash benchmarks/gpu_check.sh            # ~3-5 min on one H100/H200-class GPU
# PEAK_TFLOPS (default 989, H100/H200 dense bf16) sets the MFU denominator.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"

python - <<'EOF' || exit $?
import sys
import torch
if not torch.cuda.is_available():
    print("gpu_check: CUDA is not available on this machine (torch %s); nothing was measured" % torch.__version__,
          file=sys.stderr)
    sys.exit(2)
EOF

python - <<'EOF'
import json, os, time
import torch
from gptforge.generate import generate
from gptforge.model import GPT, causal_lm_loss
from gptforge.train.optim import build_optimizer

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = True
device = "cuda"
model = GPT.from_config("gpt2").to(device).train()
n_params = model.num_params(non_embedding=True)
optimizer = build_optimizer(model, lr=6e-4)  # fused AdamW on CUDA
assert optimizer.defaults.get("fused"), "expected the fused AdamW kernel on CUDA"
step_fn = torch.compile(model)
batch, seq = 16, 1024
x = torch.randint(0, 50257, (batch, seq + 1), device=device)

def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = causal_lm_loss(step_fn(x[:, :-1]), x[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

start = time.perf_counter()
for _ in range(3):
    step()
torch.cuda.synchronize()
compile_s = time.perf_counter() - start
steps = 20
start = time.perf_counter()
for _ in range(steps):
    loss = step()
torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / steps
tokens_s = batch * seq / seconds
# 6N per token for the weights plus attention's 12 * layers * seq * width (PaLM appendix B).
c = model.config
flops_per_token = 6 * n_params + 12 * c.n_layer * seq * c.n_embd
peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
print(json.dumps({"part": "pretrain", "model": "gpt2-124M", "batch": batch, "seq": seq, "tokens_per_s": round(tokens_s),
                  "mfu": round(tokens_s * flops_per_token / peak, 3), "first_3_steps_s": round(compile_s, 1),
                  "loss": round(float(loss), 3), "gpu": torch.cuda.get_device_name()}), flush=True)

model = model.eval().to(torch.bfloat16)
for rows in (1, 8):
    prompts = torch.randint(0, 50257, (rows, 16)).tolist()
    timed = {}
    for new in (1, 129):
        generate(model, prompts, max_new_tokens=new, eos_token_id=[])
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=new, eos_token_id=[])
        torch.cuda.synchronize()
        timed[new] = time.perf_counter() - start
    print(json.dumps({"part": "decode", "dtype": "bfloat16", "batch": rows,
                      "tokens_per_s": round(rows * 128 / (timed[129] - timed[1]), 1)}), flush=True)
EOF

python benchmarks/serve_load.py --preset llama-small --concurrency 1,16 --requests-per-level 32 --max-tokens 64
