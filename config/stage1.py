# Stage 1 (align) of MoCHA-Phi2, paper Table 8 / the released scripts:
#   torchrun --nproc_per_node=8 train.py config/stage1.py
# Only the four MoECs train; encoders and Phi-2 stay frozen.
out_dir = 'out/mocha-phi2-stage1'
data_json = 'playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'  # LLaVA LCS-558K
image_folder = 'playground/data/LLaVA-Pretrain/images'
template = 'plain'
stage = 1
llm = 'microsoft/phi-2'
learning_rate = 1e-3
weight_decay = 0.0
batch_size = 4                 # per GPU: 4 x 8 GPUs = 32
gradient_accumulation_steps = 1
epochs = 1
warmup_ratio = 0.03
max_length = 2560              # text + 1693 visual tokens
dtype = 'bfloat16'
gradient_checkpointing = True
save_interval = 1000
# Memory per GPU, traced by `python bench.py --table=memory` (one step at these settings, 8 GPUs;
# docs/benchmarks.md): DDP peaks at 29.1 GiB (17.5 of it the float32 frozen encoders and Phi-2): fits 8x80 and
# 8x48 GB. 8x24 GB: parallel = 'fsdp' (14.9 GiB), batch_size and gradient_accumulation_steps unchanged.
