# The offline shapes world: a tiny MoCHA (all four tiny encoders, MoECs, HGA, a tiny Llama-style LM)
# trained on 2 CPU cores in minutes, then scored on the held-out shapes POPE / GQA / MME.
# The tiny encoders have no pretrained weights and stay frozen at their random init, as the real
# configs keep theirs: training them from scratch through the LM collapses their features.
out_dir = 'out/shapes'
prepare_shapes_data = True
data_json = 'data/shapes/instruct.json'
image_folder = 'data/shapes/images'
eval_shapes_at_end = True
template = 'phi'
stage = 2                      # MoECs + LLM (+ encoders) from scratch: a random LM has nothing to align to
encoder_source = 'tiny'
encoder_resolution = (48, 96, 48, 48)  # siglip, convnext, clip, dinov2: each a 3x3 token grid, one token per scene cell
image_size = 64
train_encoders = False
llm = 'tiny'
llm_source = 'tiny'
tokenizer = 'data/shapes/tokenizer'
max_length = 512
learning_rate = 1e-3
batch_size = 16
epochs = 4
num_workers = 1
log_interval = 20
save_interval = 200
device = 'cpu'
dtype = 'float32'              # bf16 autocast is slow on CPUs
gradient_checkpointing = False
