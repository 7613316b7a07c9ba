# Stage 1 of MoCHA-Vicuna7B: as config/stage1.py with Vicuna-7B v1.5 as the LLM.
exec(open('config/stage1.py').read())
out_dir = 'out/mocha-vicuna7b-stage1'
llm = 'lmsys/vicuna-7b-v1.5'
