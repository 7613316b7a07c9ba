# The shapes world's text step: pretrain its tiny LM on text, as MoCHA's LLMs (Phi-2, Vicuna) come pretrained.
#   python train.py config/shapes_lm.py                        # 19 min on 2 idle cores -> out/shapes-lm/llm
#   python train.py config/shapes.py --llm=out/shapes-lm/llm   # the image step from the rebuilt LM
# The repo ships this command's output as weights/shapes-lm (seed 1337, 2 CPU threads), which config/shapes.py
# names as its llm. It trains on text.json: the same kind of conversations about scenes written as 9 words, one
# per cell ('empty large_red_circle ...'), where '<image>' would stand. Why: a random LM learns to look a named
# object up in what it reads (is there a red circle?) only after 1 000-2 000 steps, at a step that varies from
# seed to seed (docs/log.md); on images those steps cost the encoders, MoECs and HGA too.
# The rest of MoCHA is built and saved but not trained (train_connectors, train_encoders); export_llm keeps
# the LM alone.
exec(open('config/shapes.py').read())  # the same world, template, tokenizer and optimizer; what differs:
out_dir = 'out/shapes-lm'
data_json = 'data/shapes/text.json'
llm = 'tiny'                   # a random tiny Llama (mocha.TINY_LLM)
llm_source = 'tiny'
train_connectors = False       # the LM alone, no blank image through the image path: 18 min 50 s, not 26 min 30 s (docs/log.md)
train_encoders = False
export_llm = True              # out/shapes-lm/llm: an HF folder (weights + tokenizer) to use as an llm
eval_shapes_at_end = True
shapes_benchmarks = 'gqa_words'  # the shapes GQA's questions about its scenes written in words: per family (docs/shapes.md)
epochs = 3                     # 7 350 steps (39 200 conversations after the held-out 2 %). One epoch left each
                               # seed with its own subset of skills (GQA in words), and the image step followed;
                               # two learnt existence on 5 seeds in 5 but position on 3; three, with position
                               # in every conversation (shapes.TEXT_ALWAYS), both (docs/log.md)
max_steps = 0                  # not config/shapes.py's cut: all of those epochs
eval_interval = 500
