# MoVA beside MoCHA-Phi2, stage 1 (align): the same encoders, LLM, data and schedule as config/stage1.py, with MoVA's
# MoV-Adapter (mova.py) in place of the MoECs and HGA: CLIP-L/14-336 is the base, SigLIP, ConvNeXt and DINOv2 its
# experts, every expert on (MoVA's routing, the LLM picking the experts per question, is not built yet: README).
#   torchrun --nproc_per_node=8 train.py config/mova_stage1.py
exec(open('config/stage1.py').read())
out_dir = 'out/mova-phi2-stage1'
connector = 'mova'
mova_base = 'clip'
mova_blocks = 3                # the released MoVAdapter's num_projector_layers, topk_experts and 2x pooling
mova_top_k = 3
mova_pool = 2                  # 24x24 CLIP tokens -> 144 visual tokens (MoCHA: 1693)
