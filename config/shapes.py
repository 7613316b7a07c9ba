# The offline shapes world: a tiny MoCHA (all four tiny encoders, MoECs, HGA, a tiny Llama-style LM)
# trained on 2 CPU cores in minutes, then scored on the held-out shapes POPE / GQA / MME.
# The tiny encoders have no pretrained weights, so this config trains them too (train_encoders, off
# in the real configs), at 1/100 of the learning rate: at the full rate the model never learns to
# use the image (README, "The shapes world").
out_dir = 'out/shapes'
prepare_shapes_data = True
data_json = 'data/shapes/instruct.json'
image_folder = 'data/shapes/images'
eval_shapes_at_end = True
template = 'phi'
stage = 2                      # MoECs + LLM + encoders from scratch: a random LM has nothing to align to
encoder_source = 'tiny'
encoder_resolution = (48, 64, 48, 48)  # siglip, convnext, clip, dinov2: ViT tokens on the scene's 3x3 grid
image_size = 64
train_encoders = True
encoder_lr_scale = 0.01
llm = 'tiny'
llm_source = 'tiny'
tokenizer = 'data/shapes/tokenizer'
max_length = 512
learning_rate = 1e-3
batch_size = 16
epochs = 3
num_workers = 1
log_interval = 20
save_interval = 200
val_fraction = 0.02            # 245 of the 12 240 samples held out: the validation loss every eval_interval
eval_interval = 100
device = 'cpu'
dtype = 'float32'              # bf16 autocast is slow on CPUs
gradient_checkpointing = False
