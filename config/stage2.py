# Stage 2 (instruct) of MoCHA-Phi2, paper Table 8 / the released scripts:
#   torchrun --nproc_per_node=8 train.py config/stage2.py
# MoECs + Phi-2 train, starting from stage 1's MoECs. Images padded to square with the mean colour.
out_dir = 'out/mocha-phi2-stage2'
init_from = 'out/mocha-phi2-stage1/ckpt'
data_json = 'playground/data/llava_v1_5_mix665k.json'  # LLaVA-v1.5 mix 665K
image_folder = 'playground/data'                       # coco/, gqa/, ocr_vqa/, textvqa/, vg/ below it
template = 'phi'
image_aspect = 'pad'           # the released finetune.sh's --image_aspect_ratio pad (stage 1 crops the centre)
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
# Memory per GPU, traced by `python bench.py --table=memory` (one step at these settings, 8 GPUs;
# docs/benchmarks.md): FSDP peaks at 17.5 GiB, so this config runs on 8x80, 8x48 (the paper's L40s) and 8x24 GB
# cards as it is. A DDP replica peaks at 57.2 GiB (float32 weights 17.5, gradients 10.9, AdamW 21.8): on 8x80 GB
# cards parallel = 'ddp' fits too.
parallel = 'fsdp'
