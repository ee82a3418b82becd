"""TRL's chunked log-prob kernel alone on CPU: its tiles against smaller ones (times and max differences).

    .venv/bin/python bench/lm_head_tiles.py 1800    # tokens; H 896, V 151936 (Qwen2.5-0.5B shapes)
"""
import time, torch, sys
import trl.kernels.chunked_logprob as ck
from trl.kernels import ChunkedLogProbFunction as F
torch.manual_seed(0)
N, H, V = int(sys.argv[1]), 896, 151936
h = torch.randn(N, H, requires_grad=True)
w = torch.randn(V, H) * 0.02
t = torch.randint(0, V, (N,))
outs = ("log_probs", "entropy", "mean_logits", "is_top1")
def run(chunk, tok, outputs=outs):
    ck.TOKEN_CHUNK_SIZE = tok
    h.grad = None
    t0 = time.perf_counter()
    lp, *_ = F.apply(h, w, None, t, 1.0, chunk, None, 1.0, outputs)
    t1 = time.perf_counter()
    lp.sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, lp.detach(), h.grad.clone()
def plain():
    h.grad = None
    t0 = time.perf_counter()
    lp = torch.log_softmax(h @ w.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    t1 = time.perf_counter(); lp.sum().backward(); t2 = time.perf_counter()
    return t1 - t0, t2 - t1, lp.detach(), h.grad.clone()
t0=time.perf_counter(); (h.detach() @ w.t()); print("bare mm", time.perf_counter()-t0)
ref = run(32768, 4096)
print("default 32768x4096", ref[:2])
for chunk, tok in [(8192, 256), (4096, 512), (16384, 256), (8192, 1024)]:
    r = run(chunk, tok); print(chunk, tok, r[:2], (r[2]-ref[2]).abs().max().item(), (r[3]-ref[3]).abs().max().item())
r = run(8192, 256, ("log_probs",)); print("8192x256 logprobs only", r[:2])
r = plain(); print("plain", r[:2], (r[2]-ref[2]).abs().max().item())
