# MoVA beside MoCHA-Phi2, stage 2 (instruct): config/stage2.py's recipe from config/mova_stage1.py's checkpoint,
# whose architecture it repeats (the checkpoint brings it anyway; bench.py reads it from here).
#   torchrun --nproc_per_node=8 train.py config/mova_stage2.py
exec(open('config/stage2.py').read())
out_dir = 'out/mova-phi2-stage2'
init_from = 'out/mova-phi2-stage1/ckpt'
connector = 'mova'
mova_base = 'clip'
mova_blocks = 3
mova_top_k = 3
mova_pool = 2
