"""
Trains MoCHA, both stages (the paper's Table 8 and the released scripts), on one process or many.

    python train.py config/shapes_lm.py                       # the offline shapes world, CPU: its LM on text,
    python train.py config/shapes.py                          # then MoCHA on its images
    torchrun --nproc_per_node=8 train.py config/stage1.py     # align: MoECs only
    torchrun --nproc_per_node=8 train.py config/stage2.py     # instruct: MoECs + LLM

DDP by default (NCCL on GPU, gloo on CPU); parallel='fsdp' shards the model with PyTorch FSDP
(fully_shard); what fits which cards: `python bench.py --table=memory`. Checkpoints go to out_dir/ckpt atomically and
init_from='resume' continues a run exactly where it stopped. Every log step appends the loss parts,
speed, FLOP/s, MFU, expert usage and HGA statistics to out_dir/metrics.jsonl (`python plot.py out/shapes`).
"""
import collections
import dataclasses
import fcntl
import itertools
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm
from transformers import AutoTokenizer

from data import IMAGE_ASPECTS, TEMPLATES, LLaVADataset, collate, dry_run_report, length_grouped, load_image
from mocha import (ENCODER_ORDER, IGNORE_INDEX, MoCHA, MoCHAConfig, collapsed_experts, count_flops, image_digests,
                   lean_memory_tracker)

# -----------------------------------------------------------------------------
# default config: stage 1 of MoCHA-Phi2 (paper Table 8). config/*.py files override these.
# I/O
out_dir = 'out'
init_from = 'scratch'      # 'scratch' | 'resume' (out_dir/ckpt) | a MoCHA checkpoint dir (stage 2 from stage 1);
                           # a checkpoint brings its own architecture: a model setting that differs from it stops the run
upcycle_from = ''          # a new (stage-1) run's MoECs start as copies of an MLP connector (Table 4): a checkpoint
                           # dir of a 1-expert run (every encoder's), or LLaVA-1.5's mm_projector.bin (CLIP's)
log_interval = 10          # optimizer steps
save_interval = 1000       # optimizer steps; the end of the run always saves; 0 = only the end
stop_at_step = 0           # stop (and save) after this many steps, as if the job were killed; 0 = never
eval_shapes_at_end = False # score the shapes benchmarks with eval.py when training ends
shapes_benchmarks = 'pope,gqa,mme,lab_pope,lab_gqa'  # which ones (eval.SHAPES_BENCHMARKS; 'gqa_words': GQA about scenes in words)
export_llm = False         # when training ends, also save the LLM alone, HF format, to out_dir/llm (config/shapes_lm.py)
merge_lora = False         # when a LoRA run ends, also save out_dir/merged: the adapters folded into the LLM's weights,
                           # a plain checkpoint (MoCHA.merge_lora; for a finished run's ckpt, the README's one-liner)
eval_interval = 0          # optimizer steps between validation losses (and one at the end); 0 = never
eval_iters = 0             # batches per validation loss; 0 = the whole held-out slice
collapse_fraction = 0.1    # WARNING when an expert's share of a MoEC's routed tokens stays below this
collapse_window = 5        # fraction of the fair share 1/E, averaged over this many log steps
profile = False            # time each part of the step (data, encoders, MoECs, HGA, LM, backward, optimizer): a table at the end
trace_memory = False       # CPU: each step's peak bytes by torch's MemTracker into the log (slow); a GPU's are always logged
# data
data_json = 'playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_folder = 'playground/data/LLaVA-Pretrain/images'
val_fraction = 0.0         # hold out this fraction of data_json (the same samples every run) for the validation loss
prepare_shapes_data = False  # write data/shapes first if it is missing (the offline world)
template = 'plain'
image_aspect = 'crop'      # 'crop' (stage 1, as the released pretrain.sh) | 'pad' to a square (stage 2; data.py says why)
max_length = 2560          # text + visual tokens
on_bad_sample = 'skip'     # 'skip' (and count) | 'error'
dry_run = False            # print samples token by token, lengths and skips, then exit; loads no weights
max_skipped_fraction = 0.01  # dry_run exits non-zero when more samples than this are skipped
num_workers = 4
group_by_length = 0        # batches of samples of about the same length, sorted in runs of this many batches
                           # (less padding); 0 = off, the samples in shuffled order
sort_micro_batches = False # each optimizer step's samples sorted by length into its gradient_accumulation_steps
                           # micro-batches: less padding, and the step learns from the same samples as without
                           # (its MoEC balance loss is then the micro-batches' mean, as under any accumulation)
# model
stage = 1                  # 1: MoECs (align); 2: MoECs + LLM (instruct)
encoders = ENCODER_ORDER
encoder_source = 'pretrained'
encoder_paths = {}         # name -> local folder (or HF id / open_clip tag) in place of the public weights
encoder_resolution = 336    # one side for every encoder, or a tuple in ENCODER_ORDER
image_size = 336
train_encoders = False
tower_tokens = ''          # a folder of the frozen towers' tokens for data_json's images, one file per tower: the first
                           # run that names it computes them, every later one reads them and skips the towers
                           # (ablate.py: 85 runs of the same towers on the same images)
train_connectors = True    # False: the LLM alone, on text (config/shapes_lm.py): no image path to keep in step
encoder_lr_scale = 1.0     # trained encoders learn at learning_rate * this
connector_lr_scale = 1.0   # the MoECs learn at learning_rate * this (LoRA: LLaVA's mm_projector_lr 2e-5 vs 2e-4)
feature_layer = -2
fusion = 'sequence'
num_experts = 4
top_k = 2
hga = True
k_intra = 7
k_inter = 3
connector = 'moec'         # 'moec': MoCHA's MoECs + HGA | 'mova': MoVA's MoV-Adapter instead (mova.py), every expert on
mova_base = 'clip'         # MoVA: the base encoder whose tokens the experts' are fused into
mova_blocks = 3            #       its blocks, the experts each image's gate keeps, the grid's pooling per side
                           #       (the released 3, 3, 2)
mova_top_k = 3
mova_pool = 2
routing_from = ''          # MoVA: a trained MoVA checkpoint (every expert on) labels routing_samples of data_json's samples
routing_samples = 0        #   by MoVA's rule into out_dir/routing/ (mova.write_routing_data), whose data and tokenizer
                           #   this run trains on; 0 = every sample with an image
eval_route = ''            # MoVA, eval_shapes_at_end: '' every expert | 'llm' its routing pass first | 'oracle' (eval.py)
probe_json = 'weights/towers/probe.json'  # the lab's probe matrix: the oracle, and what 'llm' routing is scored against
balance_coef = 0.1         # Eq. 10: the weights of the MoECs' load-balancing loss
z_coef = 0.01              #          and of their routers' z-loss
llm = 'microsoft/phi-2'
llm_source = 'pretrained'
llm_layers = 0             # 'tiny'/'random' LLMs only: this many decoder layers instead of the config's
lora_rank = 0              # stage 2: > 0 trains LoRA adapters (peft) on the LLM's linear layers instead of all of it
lora_alpha = 256           # (config/stage2_lora.py: LLaVA-1.5's finetune_lora.sh); the MoECs train in full
lora_dropout = 0.05
tokenizer = ''
# optimizer (AdamW), schedule (cosine, 3 % warmup)
learning_rate = 1e-3
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
batch_size = 4             # per process, per micro-step
gradient_accumulation_steps = 1
epochs = 1
max_steps = 0              # 0: as many optimizer steps as `epochs` passes over the data take
warmup_ratio = 0.03
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'         # autocast dtype; 'float32' turns autocast off
parallel = 'ddp'           # 'ddp' | 'fsdp'
gradient_checkpointing = True
seed = 1337
data_seed = -1             # the data's seed (the shuffle, MoVA's labelled samples); -1: `seed`, which also seeds
                           # the weights (set both apart to tell a seed's init from its data order)
config_keys = [k for k, v in globals().items()  # the lower-case globals above (constants are upper-case)
               if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, dict))]
defaults = {k: globals()[k] for k in config_keys}
exec(open('configurator.py').read())  # overrides from config/*.py and --key=value
config = {k: globals()[k] for k in config_keys}  # what the checkpoint records: the config, no run-time state
overridden = {k for k in config_keys if config[k] != defaults[k]}  # by a config file or the command line
# -----------------------------------------------------------------------------
# every process checks the enumerated options, so a typo never falls back to a default under torchrun
for name, allowed in (('parallel', ('ddp', 'fsdp')), ('stage', (1, 2)), ('template', TEMPLATES),
                      ('fusion', ('sequence', 'channel')), ('connector', ('moec', 'mova')),
                      ('eval_route', ('', 'llm', 'oracle')),
                      ('on_bad_sample', ('skip', 'error')),
                      ('image_aspect', IMAGE_ASPECTS),
                      ('dtype', ('float32', 'bfloat16', 'float16'))):
    if config[name] not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {config[name]!r}")
if stage == 1 and not train_connectors:
    raise ValueError("stage 1 trains the connectors alone: train_connectors=False leaves nothing to train")
if lora_rank and stage != 2:
    raise ValueError(f"lora_rank={lora_rank}: LoRA adapts the LLM, which only stage 2 trains")
if (routing_from or eval_route) and connector != 'mova':
    raise ValueError(f"routing_from and eval_route are MoVA's routing, and connector={connector!r}")
if group_by_length and sort_micro_batches:
    raise ValueError("group_by_length regroups samples across steps, sort_micro_batches within a step: one or the other")

# distributed setup: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE
distributed = int(os.environ.get('RANK', -1)) != -1
if distributed:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
torch.manual_seed(seed)  # the weights
data_order_seed = seed if data_seed < 0 else data_seed
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
autocast = (nullcontext() if dtype == 'float32' else
            torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
if master:
    os.makedirs(out_dir, exist_ok=True)
ckpt_dir = os.path.join(out_dir, 'ckpt')


def log(*args):
    if master:
        tqdm.write(' '.join(str(a) for a in args))


# dense bf16 peak FLOP/s of known GPUs (vendor datasheets, no sparsity), by a part of the device name;
# more specific names first. MFU is None on other devices and on CPU.
BF16_PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('H800', 989e12), ('A100', 312e12),
                   ('A800', 312e12), ('L40S', 362e12))
device_peak_flops = None
if device_type == 'cuda':
    device_name = torch.cuda.get_device_name(device)
    device_peak_flops = next((peak for part, peak in BF16_PEAK_FLOPS if part in device_name), None)


# -----------------------------------------------------------------------------
# data
shapes_dir = os.path.dirname(data_json)  # the shapes world's folder (its benchmarks), whatever data routing adds
if prepare_shapes_data:
    from shapes import prepare_shapes
    if master and not os.path.exists(data_json):
        prepare_shapes(shapes_dir)
    if llm_source == 'pretrained' and not os.path.isdir(llm):
        raise FileNotFoundError(f"llm={llm!r} is not there yet: the shapes world's LM is pretrained on text first, "
                                f"by `python train.py config/shapes_lm.py`")
    if distributed:
        dist.barrier()
if eval_shapes_at_end and not dry_run:  # the benchmarks' files are checked now, not after hours of training
    from eval import shapes_files
    shapes_benchmark_files = shapes_files(shapes_dir)
    for benchmark in shapes_benchmarks.split(','):
        if benchmark not in shapes_benchmark_files:
            raise ValueError(f"shapes_benchmarks: unknown {benchmark!r}, expected some of {list(shapes_benchmark_files)}")
        missing = [path for path in shapes_benchmark_files[benchmark].values() if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(f"eval_shapes_at_end: {benchmark} needs {missing}, which is not there (written by "
                                    f"an older shapes.py? delete {shapes_dir} and run `python shapes.py`)")
if routing_from and not dry_run:  # MoVA's routing data: labelled once, by a MoVA model trained with every expert
    routing_dir = os.path.join(out_dir, 'routing')
    if master and not os.path.exists(os.path.join(routing_dir, 'instruct.json')):  # a resumed run keeps its labels
        from mova import write_routing_data
        started = time.time()
        counts = write_routing_data(MoCHA.from_pretrained(routing_from).to(device), data_json, image_folder,
                                    routing_dir, max_samples=routing_samples, seed=data_order_seed)
        log(f"routing data in {routing_dir} ({time.time() - started:.0f} s), labelled by {routing_from}: answers with "
            f"each expert letter or none: {dict(sorted(counts.items()))}")
    if distributed:
        dist.barrier()
    data_json, tokenizer = os.path.join(routing_dir, 'instruct.json'), os.path.join(routing_dir, 'tokenizer')

model_config = MoCHAConfig(
    encoders=tuple(encoders), encoder_source=encoder_source, encoder_paths=dict(encoder_paths),
    encoder_resolution=dict(zip(ENCODER_ORDER, encoder_resolution if isinstance(encoder_resolution, tuple)
                                else (encoder_resolution,) * len(ENCODER_ORDER))), image_size=image_size,
    feature_layer=feature_layer, train_encoders=train_encoders, fusion=fusion,
    num_experts=num_experts, top_k=top_k, hga=hga, k_intra=k_intra, k_inter=k_inter, balance_coef=balance_coef,
    z_coef=z_coef, llm=llm, llm_source=llm_source, llm_layers=llm_layers, tokenizer=tokenizer or None,
    template=template, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, connector=connector,
    mova_base=mova_base, mova_blocks=mova_blocks, mova_top_k=mova_top_k, mova_pool=mova_pool)
ARCHITECTURE = ('encoders', 'encoder_source', 'encoder_paths', 'encoder_resolution', 'image_size', 'feature_layer',
                'fusion', 'num_experts', 'top_k', 'hga', 'k_intra', 'k_inter', 'llm', 'llm_source', 'llm_layers', 'connector',
                'mova_base', 'mova_blocks', 'mova_top_k', 'mova_pool')
LORA = ('lora_rank', 'lora_alpha', 'lora_dropout')  # a stage-1 checkpoint gets adapters in stage 2; a resumed run
                                                    # keeps its own

def warn_past_trained_positions(llm_config):
    trained_positions = getattr(llm_config, 'max_position_embeddings', None)
    if trained_positions and max_length > trained_positions:
        # the released MoCHA scripts train Phi-2 (2048 positions) at 2560 so that 1693 visual tokens leave room
        log(f"WARNING: max_length={max_length} is past the {trained_positions} positions {llm} was trained on "
            f"(max_position_embeddings): positions {trained_positions}-{max_length - 1} get rotary angles it never "
            f"saw (extrapolated, not clamped)")


if dry_run:  # the data as the model will get it; the architecture is built on the meta device, no weights
    with torch.device('meta'):
        shape_only = MoCHA(dataclasses.replace(
            model_config, tokenizer=None if llm_source == 'pretrained' else model_config.tokenizer,
            **{k: 'random' for k in ('encoder_source', 'llm_source') if getattr(model_config, k) == 'pretrained'}))
    dry_tokenizer = AutoTokenizer.from_pretrained(tokenizer or llm)
    warn_past_trained_positions(shape_only.llm.config)
    problems = dry_run_report(LLaVADataset(data_json, image_folder, dry_tokenizer, template, image_size, max_length,
                                           shape_only.num_visual_tokens, on_bad_sample, image_aspect),
                              max_skipped_fraction=max_skipped_fraction)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    raise SystemExit(1 if problems else 0)

# -----------------------------------------------------------------------------
# model: scratch, or a checkpoint (resume, or stage 2 from stage 1)
def check_settings_against(checkpoint_dir):
    """A checkpoint rebuilds the architecture in its config.json: a model setting of this run that differs from
    it would be ignored without a word, so it stops the run here, named; and upcycling would overwrite the
    checkpoint's trained MoECs."""
    with open(os.path.join(checkpoint_dir, 'config.json')) as f:
        saved = json.load(f)
    wanted = json.loads(json.dumps(dataclasses.asdict(model_config)))  # tuples as JSON lists, as saved
    checked = ARCHITECTURE + LORA if init_from == 'resume' else ARCHITECTURE
    differing = [f"{k}={wanted[k]!r} (the checkpoint's: {saved.get(k)!r})" for k in checked
                 if k in overridden and wanted[k] != saved.get(k)]
    problems = [f"the model is rebuilt from {checkpoint_dir}/config.json, so these settings would be ignored: "
                f"{', '.join(differing)}; drop them, or start from scratch"] if differing else []
    if upcycle_from and init_from != 'resume':
        problems.append(f"upcycle_from={upcycle_from} seeds the MoECs of a new run (stage 1), and the checkpoint "
                        f"already brings trained MoECs, which it would overwrite")
    if problems:
        raise ValueError(f"init_from={init_from}: " + '; and '.join(problems))


training_settings = dict(template=template, train_encoders=train_encoders, balance_coef=balance_coef, z_coef=z_coef,
                         **{k: config[k] for k in LORA})
if init_from == 'resume':
    resume_dir = ckpt_dir if os.path.isdir(ckpt_dir) else ckpt_dir + '.old'  # .old: killed mid-save
    check_settings_against(resume_dir)
    model = MoCHA.from_pretrained(resume_dir, **training_settings)
elif init_from != 'scratch':
    check_settings_against(init_from)
    model = MoCHA.from_pretrained(init_from, **training_settings)
else:
    model = MoCHA(model_config)
if routing_from and len(model.tokenizer) < len(AutoTokenizer.from_pretrained(tokenizer)):
    raise ValueError(f"routing_from: {tokenizer} holds the routing prompt's words, appended to the tokenizer, and "
                     f"init_from={init_from} brings its own, smaller one: start the routed run from scratch")
start_step, skipped_total = 0, 0
if init_from == 'resume':  # the step now; the optimizer's state and the RNG once it is built
    train_state = torch.load(os.path.join(resume_dir, 'train_state.pt'), weights_only=False)
    start_step, skipped_total = train_state['step'], train_state['skipped']
if upcycle_from and init_from != 'resume':  # paper Table 4: each MLP connector becomes an upcycled MoEC
    if os.path.isdir(upcycle_from):  # a MoCHA checkpoint with one expert per connector (num_experts=1, top_k=1)
        connectors = load_file(os.path.join(upcycle_from, 'model.safetensors'))
        mlps = {name: {k.removeprefix(f'moecs.{name}.'): v for k, v in connectors.items()
                       if k.startswith(f'moecs.{name}.')} for name in model.moecs}
    else:  # LLaVA-1.5's mm_projector.bin: its one MLP reads CLIP, so it seeds the CLIP connector
        projector = torch.load(upcycle_from, map_location='cpu', weights_only=True)
        mlps = {'clip': {k.split('mm_projector.')[-1]: v for k, v in projector.items()}}
    for name, mlp in mlps.items():
        try:
            model.moecs[name].upcycle_from(mlp)
        except ValueError as err:
            raise ValueError(f"upcycle_from={upcycle_from}, the {name} connector: {err}") from None
    log(f"upcycled every expert of the {', '.join(mlps)} connector(s) from {upcycle_from}")

# stage 1 trains the MoECs; stage 2 the MoECs and the LLM, or its LoRA adapters (the LLM alone with
# train_connectors=False). Encoders only with train_encoders.
model.set_trainable(stage, train_connectors, train_encoders)
if gradient_checkpointing:
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    model.llm.config.use_cache = False
model.to(device)
tokenizer_ = model.tokenizer
pad_id = tokenizer_.pad_token_id if tokenizer_.pad_token_id is not None else tokenizer_.eos_token_id
log(f"stage {stage}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable of "
    f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {model.num_visual_tokens} visual tokens")
warn_past_trained_positions(model.llm.config)

# MoVA: the routing labels' experts per sample (mova.write_routing_data); every expert where a sample names none
dataset = LLaVADataset(data_json, image_folder, tokenizer_, template, image_size, max_length,
                       model.num_visual_tokens, on_bad_sample, image_aspect, experts=model.mova_experts)
# the held-out slice for the validation loss: a fixed-seed draw, so the same samples whatever `seed` is
held_out = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:math.ceil(val_fraction * len(dataset))]
val_indices = sorted(held_out.tolist())
train_indices = sorted(set(range(len(dataset))) - set(val_indices))
micro_steps_per_epoch = len(train_indices) // (batch_size * world_size)
steps_per_epoch = micro_steps_per_epoch // gradient_accumulation_steps
total_steps = max_steps or steps_per_epoch * epochs
assert total_steps > 0, f"{len(train_indices)} samples make no optimizer step of {batch_size}x{world_size}x{gradient_accumulation_steps}"
warmup_steps = math.ceil(warmup_ratio * total_steps)
train_lengths = {i: dataset.estimated_length(i) for i in train_indices} if group_by_length or sort_micro_batches else None


def cached_tower_tokens(folder, batch_size=64):
    """name -> (image digests, tokens [M, N_g, d_enc]) for every readable image of data_json, read from
    folder/<name>-<fingerprint>.safetensors, or first computed into it in a fixed order and batch size, so that every
    run reading the file gets the same tokens. Under a lock: runs started together compute it once."""
    os.makedirs(folder, exist_ok=True)
    files = {name: os.path.join(folder, f'{name}-{fingerprint}.safetensors')
             for name, fingerprint in model.encoders.fingerprints().items()}
    with open(os.path.join(folder, 'lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        missing = [name for name, file in files.items() if not os.path.exists(file)]
        if missing:
            started, digests, tokens = time.time(), [], {name: [] for name in missing}
            paths = sorted({dataset.image_path(s) for s in dataset.samples if s.get('image')})
            for start in range(0, len(paths), batch_size):
                images = []
                for path in paths[start:start + batch_size]:
                    try:
                        images.append(load_image(path, image_size, image_aspect))
                    except OSError:
                        pass  # the dataset skips (and counts) its samples
                if not images:
                    continue
                images = torch.stack(images)                                            # [b, 3, S, S] uint8
                digests += image_digests(images)
                with torch.no_grad():
                    computed = model.encoders(images.to(device), skip=set(files) - set(missing))
                for name, name_tokens in zip(files, computed):                          # each [b, N_g, d_enc]
                    if name in missing:
                        tokens[name].append(name_tokens.float().cpu())
            digest_bytes = torch.tensor([list(bytes.fromhex(d)) for d in digests], dtype=torch.uint8)  # [M, 20]
            for name in missing:
                save_file({'digests': digest_bytes, 'tokens': torch.cat(tokens[name])}, files[name] + '.tmp')
                os.replace(files[name] + '.tmp', files[name])
            log(f"tower tokens of {len(digests)} images for {', '.join(missing)} in {time.time() - started:.0f} s: "
                f"{', '.join(files[name] for name in missing)}")
    cached = {}
    for name, file in files.items():
        saved = load_file(file)
        cached[name] = ([bytes(row).hex() for row in saved['digests'].tolist()], saved['tokens'])
    return cached


if tower_tokens:
    model.encoders.use_cached_tokens(cached_tower_tokens(tower_tokens))


def batches_of(indices):
    """The batches of these dataset samples, in this order."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
        num_workers=num_workers, collate_fn=lambda b: collate(b, pad_id, image_size),
        pin_memory=device_type == 'cuda', persistent_workers=False)
    for batch in loader:
        if not batch['ids']:
            # every sample of it was skipped (too long, unreadable image). One padding token that learns
            # nothing stands in, so this process still runs the forward and backward whose gradient
            # all-reduce (DDP) or gathers (FSDP) every other process waits in: no crash, no hang
            batch = dict(batch, input_ids=torch.full((1, 1), pad_id), labels=torch.full((1, 1), IGNORE_INDEX),
                         attention_mask=torch.ones(1, 1, dtype=torch.long))
        yield batch


def batches_from(step):
    """The micro-batches of this process from optimizer step `step` on. Each epoch is one
    shuffle of the training samples (the same on every process); process r takes every
    world_size-th sample from r, so N processes see the same global batches as one."""
    micro_step = step * gradient_accumulation_steps
    while True:
        epoch, start = divmod(micro_step, micro_steps_per_epoch)
        shuffle = torch.Generator().manual_seed(data_order_seed + epoch)
        order = [train_indices[i] for i in torch.randperm(len(train_indices), generator=shuffle).tolist()]
        if group_by_length:  # whole global batches (all processes' micro-batches) of about the same length
            order = length_grouped(order, train_lengths, batch_size * world_size, group_by_length, shuffle)
        elif sort_micro_batches:  # each step's global batch sorted, its micro-batches kept in order
            order = length_grouped(order, train_lengths, batch_size * world_size, gradient_accumulation_steps)
        per_process = order[rank::world_size][:micro_steps_per_epoch * batch_size]
        for batch in batches_of(per_process[start * batch_size:]):
            yield batch
            micro_step += 1
        # the epoch is over: the next pass starts at its micro-step 0


def step_inputs(batch, num_target_tokens, with_stats=True):
    """MoCHA.forward's arguments for one micro-batch, on the device."""
    return dict(input_ids=batch['input_ids'].to(device), attention_mask=batch['attention_mask'].to(device),
                labels=batch['labels'].to(device), images=batch['images'].to(device),
                num_target_tokens=num_target_tokens, with_stats=with_stats,
                expert_mask=batch['expert_mask'].to(device) if 'expert_mask' in batch else None)


def tokens_in(batch):
    """Positions the LLM runs over: the text's, plus each image's visual tokens in place of its placeholder."""
    return int(batch['attention_mask'].sum()) + len(batch['images']) * (dataset.num_visual_tokens - 1)


@torch.no_grad()
def estimate_val_loss():
    """nanoGPT's estimate_loss on the held-out slice: the LM loss per learned token over it (or over its first
    eval_iters global batches). Every process takes the same number of batches (FSDP gathers in each)."""
    raw_model.eval()
    per_process = val_indices[rank::world_size][:len(val_indices) // world_size]
    per_process = per_process[:eval_iters * batch_size or None]
    loss_sum, targets = torch.zeros((), device=device), 0
    for batch in batches_of(per_process):
        with autocast:  # num_target_tokens=1: the summed loss of the batch's learned tokens
            out = raw_model(**step_inputs(batch, 1, with_stats=False))
        loss_sum += out['lm_loss'].float()
        targets += int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())
    raw_model.train()
    return global_sum(loss_sum) / max(global_sum(targets), 1)


# FLOPs per token, for FLOP/s and MFU: the first micro-batch's training step counted once, on fake tensors
# (mocha.count_flops: no memory, so the first step needs no more than the others), before DDP/FSDP wrap the model
batches = batches_from(start_step)
first_batch = next(batches)
batches = itertools.chain([first_batch], batches)
with autocast:
    flops_per_token = count_flops(model, step_inputs(first_batch, 1))['model'] / max(tokens_in(first_batch), 1)

# -----------------------------------------------------------------------------
# optimizer, parallel wrapper
raw_model = model
if distributed and parallel == 'fsdp':
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    precision = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for layer in model.llm.model.layers:  # one shard unit per decoder layer, then the rest
        fully_shard(layer, mp_policy=precision)
    fully_shard(model, mp_policy=precision)
elif distributed:
    # text-only batches leave the connectors out of the graph: DDP must look for unused parameters.
    # Gradients as views into DDP's all-reduce buckets: no second float32 copy of every gradient
    # (11 GB per GPU for Phi-2 stage 2; `python bench.py --table=memory`)
    model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=True,
        gradient_as_bucket_view=True)
# built after the wrap: under FSDP the trainable parameters are the sharded ones
named_trainable = [(n.removeprefix('module.'), p) for n, p in model.named_parameters() if p.requires_grad]
trainable = [p for _, p in named_trainable]
lr_scale_of = lambda name: (encoder_lr_scale if name.startswith('encoders.') else
                             connector_lr_scale if name.startswith(('moecs.', 'mova.')) else 1.0)
param_groups = [dict(params=[p for n, p in named_trainable if lr_scale_of(n) == scale], lr_scale=scale)
                for scale in sorted({lr_scale_of(n) for n, _ in named_trainable})]
optimizer = torch.optim.AdamW([g for g in param_groups if g['params']], lr=learning_rate, betas=(beta1, beta2),
                              weight_decay=weight_decay, fused=device_type == 'cuda' and parallel != 'fsdp')
state_options = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(step, skipped):
    """Trainable weights + optimizer + step + RNG + config, to a temporary dir renamed into place."""
    model_state = get_model_state_dict(model, options=state_options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=state_options)
    if master:
        tmp_dir = ckpt_dir + '.tmp'
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raw_model.save_pretrained(tmp_dir, state_dict=model_state)
        trained = set(raw_model.trainable_state_dict())
        torch.save(dict(step=step, skipped=skipped, optimizer=optimizer_state, rng=torch.get_rng_state(),
                        config=config,
                        trained_keys=sorted(trained)),
                   os.path.join(tmp_dir, 'train_state.pt'))
        if os.path.isdir(ckpt_dir):
            shutil.rmtree(ckpt_dir + '.old', ignore_errors=True)
            os.replace(ckpt_dir, ckpt_dir + '.old')
        os.replace(tmp_dir, ckpt_dir)
        shutil.rmtree(ckpt_dir + '.old', ignore_errors=True)
    if distributed:
        dist.barrier()


if init_from == 'resume':
    # strict=False: parameters that never got a gradient (a ViT's layers after feature_layer) have no
    # optimizer state to restore
    set_optimizer_state_dict(model, optimizer, train_state['optimizer'],
                             options=dataclasses.replace(state_options, strict=False))
    torch.set_rng_state(train_state['rng'])
    log(f"resumed from {resume_dir} at step {start_step}")


def lr_at(step):
    """Linear warmup over the first 3 % of steps, then cosine to zero (HF's cosine schedule)."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def global_sum(value):
    tensor = torch.tensor(float(value), device=device)
    if distributed:
        dist.all_reduce(tensor)
    return tensor.item()


# -----------------------------------------------------------------------------
# what each log step records in out_dir/metrics.jsonl (plot.py draws it): loss parts, speed, and what the
# connectors do. Every micro-batch's out['stats'] (MoCHA.forward) goes into one flat vector of a fixed
# layout, summed over the log interval (and over processes) and then averaged.
MOEC_FIELDS, HGA_FIELDS = ('entropy', 'balance_loss', 'z_loss'), ('gate', 'intra_weight', 'inter_weight')
moec_names = list(raw_model.moecs)
experts_per_moec = len(next(iter(raw_model.moecs.values())).experts) if moec_names else 0  # MoVA: no MoECs
with_hga = raw_model.hga.enabled
stats_width = len(moec_names) * (experts_per_moec + len(MOEC_FIELDS)) + len(HGA_FIELDS) * with_hga


def stats_vector(stats):
    """out['stats'] as [usage (E), entropy, balance, z] per MoEC, then HGA's gate, intra and inter edge weights."""
    values = [torch.cat([stats[name]['usage'], torch.stack([stats[name][k] for k in MOEC_FIELDS])])
              for name in moec_names]
    if with_hga:
        values.append(torch.stack([stats['hga'][k] for k in HGA_FIELDS]))
    return torch.cat(values).float()


def stats_record(vector):
    """stats_vector's layout back to {'moec': {name: {'usage': [E floats], 'entropy': ..}}, 'hga': {'gate': ..}}."""
    values, width, record = vector.tolist(), experts_per_moec + len(MOEC_FIELDS), {'moec': {}}
    for i, name in enumerate(moec_names):
        usage, fields = values[i * width:i * width + experts_per_moec], values[i * width + experts_per_moec:(i + 1) * width]
        record['moec'][name] = dict(usage=usage, **dict(zip(MOEC_FIELDS, fields)))
    if with_hga:
        record['hga'] = dict(zip(HGA_FIELDS, values[-len(HGA_FIELDS):]))
    return record


metrics_path = os.path.join(out_dir, 'metrics.jsonl')
losses_path = os.path.join(out_dir, 'losses.txt')
if master and init_from != 'resume':  # a new run starts new curves; a resumed one appends to its own
    for path in (metrics_path, losses_path):
        if os.path.exists(path):
            os.remove(path)


def write_metrics(record):
    if master:
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(record) + '\n')


# -----------------------------------------------------------------------------
# profile: wall seconds of each part of the training steps (after the first, which warms up)
phase_seconds = collections.Counter()


def clock():
    if profile and device_type == 'cuda':
        torch.cuda.synchronize()  # a GPU runs queued kernels later: wait for them, so each part gets its own
    return time.perf_counter()


def time_forward(module, part):
    """Adds each training forward of `module` to phase_seconds[part] (validation and eval run without grad)."""
    starts = []
    module.register_forward_pre_hook(lambda *_: starts.append(clock()) if torch.is_grad_enabled() else None)
    module.register_forward_hook(lambda *_: phase_seconds.update({part: clock() - starts.pop()}) if starts else None)


connector_part, connector_modules = (('MoV-Adapter', [raw_model.mova]) if connector == 'mova'
                                     else ('MoECs', raw_model.moecs.values()))
if profile:
    for part, modules in (('encoders', [raw_model.encoders]), (connector_part, connector_modules),
                          ('HGA', [raw_model.hga]), ('LM forward', [raw_model.llm])):
        for module in modules:
            time_forward(module, part)

def step_memory_tracker():
    """trace_memory on a CPU: torch's MemTracker around one step (a GPU's allocator keeps its own peak)."""
    if not (trace_memory and device_type == 'cpu'):
        return nullcontext()
    from torch.distributed._tools.mem_tracker import MemTracker  # here: its import alone takes most of a second
    tracker = lean_memory_tracker(MemTracker(), raw_model)
    tracker.track_external(model, optimizer)
    return tracker


# the loop: one optimizer step = gradient_accumulation_steps micro-batches on every process
model.train()
if device_type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)  # the steps' peaks, not loading's
progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
                desc=f'stage {stage}', dynamic_ncols=True)
# step: the last step done, so a resumed run that had finished all its steps still exports and evaluates below
step, tick, tokens_seen, history = start_step - 1, time.time(), 0, []
stat_sums = torch.zeros(stats_width + 1, device=device)   # summed stats_vector, then how many were summed
peak_bytes = 0                                            # the highest memory of the steps since the last log
usage_window = collections.defaultdict(lambda: collections.deque(maxlen=collapse_window))  # MoEC -> [E] per log step
warned = set()                                            # (MoEC, expert) collapsed and already warned about
for step in progress:
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step) * group['lr_scale']
    started = clock()
    micro_batches = [next(batches) for _ in range(gradient_accumulation_steps)]
    phase_seconds['data'] += clock() - started
    # every learned token of the global batch weighs the same (not every micro-batch)
    global_targets = global_sum(sum(int((b['labels'][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches))
    targets_per_micro_batch = max(global_targets, 1) / (world_size * gradient_accumulation_steps)
    parts = torch.zeros(4, device=device)  # loss, lm, balance, z
    memory = step_memory_tracker()
    with memory:
        for i, batch in enumerate(micro_batches):
            skipped_total += batch['num_skipped']
            tokens_seen += tokens_in(batch)
            last = i == gradient_accumulation_steps - 1
            sync = nullcontext() if last or not distributed or parallel == 'fsdp' else model.no_sync()
            with sync, autocast:
                started = clock()
                out = model(**step_inputs(batch, targets_per_micro_batch))
                del out['logits']  # the loss has what backward needs: the [B, L, V] logits need not live through it
                forward_done = clock()
                (out['loss'] / gradient_accumulation_steps).backward()
                phase_seconds.update({'forward': forward_done - started, 'backward': clock() - forward_done})
            parts += torch.stack([out['loss'].detach(), out['lm_loss'], out['balance_loss'], out['z_loss']]).float()
            if out['stats']:  # empty when the micro-batch has no image
                stat_sums += torch.cat([stats_vector(out['stats']), stat_sums.new_ones(1)])
        started = clock()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase_seconds['optimizer'] += clock() - started
    if not isinstance(memory, nullcontext):  # the MemTracker
        peak_bytes = max(peak_bytes, memory.get_tracker_snapshot('peak')[torch.device(device)]['Total'])
    elif device_type == 'cuda':
        peak_bytes = torch.cuda.max_memory_allocated(device)
    if distributed:
        dist.all_reduce(parts)
    loss, lm_loss, balance_loss, z_loss = (parts / (world_size * gradient_accumulation_steps)).tolist()
    history.append(lm_loss)
    if (step + 1) % log_interval == 0 or step == start_step:
        seconds = time.time() - tick
        tokens_per_s, skipped = global_sum(tokens_seen) / seconds, int(global_sum(skipped_total))
        flops_per_s = flops_per_token * tokens_per_s  # model FLOPs (no recompute), all processes together
        mfu = flops_per_s / (device_peak_flops * world_size) if device_peak_flops else None
        log(f"step {step + 1}/{total_steps} loss {loss:.4f} lm {lm_loss:.4f} balance {balance_loss:.4f} "
            f"z {z_loss:.4f} lr {lr_at(step):.2e} tok/s {tokens_per_s:.0f} TFLOP/s {flops_per_s / 1e12:.3g} "
            + (f"MFU {100 * mfu:.1f}% " if mfu is not None else '') + f"skipped {skipped}"
            + (f" peak {peak_bytes / 2 ** 30:.2f} GiB" if peak_bytes else ''))
        if distributed:
            dist.all_reduce(stat_sums)
        inside = stats_record(stat_sums[:-1] / stat_sums[-1]) if stat_sums[-1] > 0 else {}
        record = dict(step=step + 1, lr=lr_at(step), loss=loss, lm_loss=lm_loss, balance_loss=balance_loss,
                      z_loss=z_loss, tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
                      flops_per_s=flops_per_s, mfu=mfu, skipped=skipped, peak_memory=peak_bytes or None,
                      collapsed=[], **inside)
        if inside:
            log('  experts ' + ' | '.join(f"{name} {' '.join(f'{u:.2f}' for u in s['usage'])} (entropy {s['entropy']:.2f})"
                                          for name, s in inside['moec'].items())
                + (' | HGA gate {gate:.2f} intra {intra_weight:.2f} inter {inter_weight:.2f}'.format(**inside['hga'])
                   if with_hga else ''))
        # an expert the router has stopped choosing: below collapse_fraction of 1/E over collapse_window log steps
        for name, s in inside.get('moec', {}).items():
            usage_window[name].append(s['usage'])
            collapsed = collapsed_experts(usage_window[name], collapse_fraction) if len(usage_window[name]) == collapse_window else []
            record['collapsed'] += [f'{name}.{e}' for e in collapsed]
            for e in collapsed:
                if (name, e) not in warned:
                    share = sum(u[e] for u in usage_window[name]) / collapse_window
                    log(f"WARNING: expert collapse: the {name} MoEC sent {100 * share:.2f}% of its routed tokens to "
                        f"expert {e} over the last {collapse_window} log steps (fair share {100 / experts_per_moec:.1f}%, "
                        f"warned below {collapse_fraction:g} of it)")
            warned = {(n, e) for n, e in warned if n != name} | {(name, e) for e in collapsed}  # warn again after a recovery
        write_metrics(record)
        tick, tokens_seen, peak_bytes = time.time(), 0, 0
        stat_sums.zero_()
        if device_type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
    if master:
        progress.set_postfix(loss=f'{loss:.3f}')
    done = step + 1 == total_steps or step + 1 == stop_at_step
    if val_indices and eval_interval and ((step + 1) % eval_interval == 0 or done):
        eval_start = time.time()
        val_loss = estimate_val_loss()
        tick += time.time() - eval_start  # the next tokens/s counts training time only
        log(f"step {step + 1}/{total_steps} val lm {val_loss:.4f} (held-out: {len(val_indices)} samples of {data_json})")
        write_metrics(dict(step=step + 1, val_loss=val_loss))
    if (save_interval and (step + 1) % save_interval == 0) or done:
        save_checkpoint(step + 1, skipped_total)
    if step == start_step:  # the profile starts after the first step
        phase_seconds.clear()
        profile_start = clock()
    if done:
        break
if master:
    with open(losses_path, 'a') as f:
        f.writelines(f'{v:.6f}\n' for v in history)
    log(f"saved {ckpt_dir}")
if profile and master and step > start_step:
    steps_timed, wall = step - start_step, clock() - profile_start
    forward_parts = ('encoders', connector_part, 'HGA', 'LM forward')
    profile_table = {part: phase_seconds[part] for part in ('data',) + forward_parts}
    profile_table['rest of the forward (splice, losses)'] = phase_seconds['forward'] - sum(profile_table[p] for p in forward_parts)
    profile_table.update(backward=phase_seconds['backward'], optimizer=phase_seconds['optimizer'])  # clipping too
    profile_table['other (logs, validation, checkpoints)'] = wall - sum(profile_table.values())
    log(f"profile: {steps_timed} steps after the first in {wall:.1f} s, per step and share:")
    for part, seconds in profile_table.items():
        log(f"  {part:<40} {1000 * seconds / steps_timed:8.1f} ms {100 * seconds / wall:5.1f} %")
if tower_tokens:
    log(f"tower tokens: {raw_model.encoders.batches_cached} batches of images read from {tower_tokens}, "
        f"{raw_model.encoders.batches_computed} run through the towers (an image not in it)")
# every process reports its own count: under DDP/FSDP all must stop at the same step. One write with its
# newline, so two processes reporting at the same instant cannot splice their lines together
print(f"rank {rank}: stopped after step {step + 1}; samples skipped as bad here: {skipped_total}\n", end='', flush=True)

if export_llm and master and step + 1 == total_steps:
    # the LLM as a plain HF causal LM + tokenizer, from the checkpoint just saved (whole, whatever the
    # parallelism): what a config names as llm, as it names microsoft/phi-2
    llm_dir = os.path.join(out_dir, 'llm')
    MoCHA.from_pretrained(ckpt_dir).llm.save_pretrained(llm_dir)
    tokenizer_.save_pretrained(llm_dir)
    log(f"saved the LLM alone to {llm_dir}")

if merge_lora and master and lora_rank and step + 1 == total_steps:
    merged_dir = os.path.join(out_dir, 'merged')
    MoCHA.from_pretrained(ckpt_dir).merge_lora().save_pretrained(merged_dir)
    log(f"saved the model with its LoRA adapters merged into the LLM to {merged_dir}")

if eval_shapes_at_end and step + 1 == total_steps:
    from eval import checkpoint_stamp, evaluate_shapes
    raw_model.eval()
    probe = None
    if eval_route and os.path.exists(probe_json):
        with open(probe_json) as f:
            probe = json.load(f)
    evaluate_shapes(raw_model, tokenizer_, shapes_dir, os.path.join(out_dir, 'eval'),
                    benchmarks=shapes_benchmarks.split(','), weights=checkpoint_stamp(ckpt_dir), route=eval_route,
                    probe=probe)
if distributed:
    # every rank tears down together: a rank that destroys its group while another still writes the checkpoint
    # has aborted at exit under gloo ("terminate called without an active exception", seen once in CI under load)
    dist.barrier()
    dist.destroy_process_group()
