# Stage 2 of MoCHA-Vicuna7B with LoRA adapters on the LLM (config/stage2_lora.py says whose recipe):
#   torchrun --nproc_per_node=8 train.py config/stage2_vicuna7b_lora.py
# Memory per GPU, traced by `python bench.py --table=memory` (8 GPUs; docs/benchmarks.md): FSDP peaks at 17.4 GiB at
# batch_size 4, under 90 % of a 24 GB A10 or RTX 4090: Vicuna-7B stage 2 on 8x24 GB. A DDP replica holds the whole
# float32 LLM (25 GiB) and peaks at 51.9 GiB: 80 GB cards only.
exec(open('config/stage2_vicuna7b.py').read())
out_dir = 'out/mocha-vicuna7b-stage2-lora'
lora_rank = 128
lora_alpha = 256
lora_dropout = 0.05
learning_rate = 2e-4
connector_lr_scale = 0.1
merge_lora = True
