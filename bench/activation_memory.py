"""Peak RSS of one backbone forward + backward with a q/v LoRA, per token (the count in
loop/training/memory_estimate.py).

    .venv/bin/python bench/activation_memory.py <model folder> 2 1024 0    # batch, length, gradient checkpointing
"""
import resource, sys, threading, time, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
def rss(): return int(open('/proc/self/statm').read().split()[1])*4096
p = sys.argv[1]; B, L, gc = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
if gc:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}); m.enable_input_require_grads()
ids = torch.randint(100, 1000, (B, L)); mask = torch.ones(B, L, dtype=torch.long); mask[0, L - 50:] = 0
import gc as g; g.collect(); base = rss(); peak = [base]; stop = threading.Event()
def s():
    while not stop.wait(0.002): peak[0] = max(peak[0], rss())
threading.Thread(target=s, daemon=True).start()
t = time.time()
h = m.base_model.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
h[:, :, :8].sum().backward()
stop.set(); time.sleep(0.01)
print(f"B={B} L={L} gc={gc} tokens={B*L} base={base/2**30:.2f}GiB delta={(peak[0]-base)/2**30:.2f}GiB per_token={(peak[0]-base)/(B*L)/2**20:.3f}MiB t={time.time()-t:.1f}s")
