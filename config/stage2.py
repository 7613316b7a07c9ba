# Stage 2 (instruct) of MoCHA-Phi2, paper Table 8 / the released scripts:
#   torchrun --nproc_per_node=8 train.py config/stage2.py
# MoECs + Phi-2 train, starting from stage 1's MoECs. Images padded to square with the mean colour.
out_dir = 'out/mocha-phi2-stage2'
init_from = 'out/mocha-phi2-stage1/ckpt'
data_json = 'playground/data/llava_v1_5_mix665k.json'  # LLaVA-v1.5 mix 665K
image_folder = 'playground/data'                       # coco/, gqa/, ocr_vqa/, textvqa/, vg/ below it
template = 'phi'
stage = 2
learning_rate = 2e-5
weight_decay = 0.0
batch_size = 4                 # per GPU: 4 x 8 GPUs = 32
gradient_accumulation_steps = 1
epochs = 1
warmup_ratio = 0.03
max_length = 2560
dtype = 'bfloat16'
gradient_checkpointing = True
save_interval = 1000
# Memory per GPU, traced by `python bench.py --table=memory` (one step at these settings, 8 GPUs):
# a DDP replica peaks at 72.8 GiB (float32 weights 17.5, gradients 10.9, AdamW 21.8), over 90 % of an
# 80 GB card, so FSDP is the default: 28.8 GiB, fits 8x80 and 8x48 GB. DDP fits 80 GB at
# batch_size = 2, gradient_accumulation_steps = 2 (63.7 GiB; global batch still 32).
# 8x24 GB: FSDP with batch_size = 1, gradient_accumulation_steps = 4 (19.8 GiB).
parallel = 'fsdp'
