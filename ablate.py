"""
The paper's ablations on the shapes world: each variant (a list of train.py overrides on top of
config/shapes.py) at each seed is one real `python train.py` run that ends with eval.py's shapes
benchmarks; the runs are gathered into one table of mean +- std over seeds (out_dir/ablation.json,
out_dir/ablation.md), and each variant is set against 'full' seed by seed: the paired difference on the headline
metrics with its 95 % interval, a verdict against the paper's direction, the smallest difference the seeds
can detect, the seeds a 1.5-point difference needs, and how much of the spread more questions would remove
(out_dir/paired.json, and in ablation.md).

References: the paper's ablations of MoCHA-Phi2, arXiv 2507.22805: the encoders and the connector in
Table 3 (MLP), Table 4 (upcycled MoEC) and Table 5 (MoEC + HGA), top-k in Table 6, channel against
sequence fusion in Figure 5. docs/ablations.md sets the miniature's table beside them.

    python ablate.py                                        # every variant, seeds 0-4, one run per core
    python ablate.py --quick=True                           # full, mlp, hga_off, siglip
    python ablate.py --variants=mlp,full --seeds=0,1 --jobs=2
    python ablate.py --variants=full --seeds=0,1 --max_steps=50   # any other --key=value goes to train.py
    python ablate.py --variants=full,mova,mova_routed,mova_oracle  # MoVA beside MoCHA (docs/mova.md)

Every run starts from config/shapes.py's llm, the tiny LM pretrained on text that the repo ships
(weights/shapes-lm), as the paper's ablations share one LLM: the seeds vary the image step alone.
--lm_config=config/shapes_lm.py first pretrains one LM per seed (out_dir/lm/seed<k>/, about 29 min each two at
a time) and starts that seed's variants from it, so the spread also holds the text step's; the table's first
row, 'lm', is then that text step scored on the shapes GQA in words (the words_* columns).
Each run writes out_dir/<variant>/seed<k>/ (checkpoint, losses.txt, train.log, eval/results.json). A run whose
eval/results.json exists and whose train.py command is unchanged is read, not redone: delete
its folder to redo it. One with the same command, a checkpoint and no results (killed, or stopped in its eval)
goes on from its checkpoint (train.py --init_from=resume). The seed is train.py's `seed` (model init and data
order, in both steps); the shapes world itself stays the one of shapes.py's fixed seed, so the spread over seeds
is training noise on one world. The towers are frozen and the same in every run (but towers_random's), so the
first run computes their tokens of every training image into out_dir/tower_tokens and the others read them
(train.py's tower_tokens); --tower_cache=False has each run compute its own, as the tables before it did.
"""
import functools
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# -----------------------------------------------------------------------------
# the variants: train.py --key=value overrides on top of config/shapes.py. 'full' is the config itself
# (MoEC E=4 k=2, HGA k_intra=7 k_inter=3, all four encoders, sequence fusion, connectors from scratch),
# so it is also the "MoEC E=4 k=2", "HGA full", "all four encoders", "sequence" and "from scratch" row.
VARIANTS = {
    'full': [],
    # connector: LLaVA's 2-layer MLP is one expert, always chosen (Table 3); k = 1 (Table 6 varies k at E = 4);
    # E = 8 (not in the paper)
    'mlp': ['--num_experts=1', '--top_k=1'],
    'moec_e2k1': ['--num_experts=2', '--top_k=1'],
    'moec_k1': ['--top_k=1'],
    'moec_e8k2': ['--num_experts=8', '--top_k=2'],
    # HGA (Table 5 against Table 4: MoEC + HGA against MoEC alone): off is the identity; one kind of edge only,
    # by setting the other k to 0 (not in the paper)
    'hga_off': ['--hga=False'],
    'hga_intra_only': ['--k_inter=0'],
    'hga_inter_only': ['--k_intra=0'],
    # encoders (Table 5, with MoEC + HGA): any subset, appended in mocha.ENCODER_ORDER
    'siglip': ["--encoders=('siglip',)"],
    'siglip_convnext': ["--encoders=('siglip','convnext')"],
    'siglip_clip_convnext': ["--encoders=('siglip','convnext','clip')"],
    # fusion (Figure 5): the encoders' tokens concatenated along channels into one connector
    'channel': ['--fusion=channel'],
    # MoEC upcycled (Table 4): every expert starts as the connector the 'mlp' run of the same seed trained.
    # A second step, after 'mlp'. Only the connectors are copied (the LM and encoders start fresh, as in
    # 'full'), and the MLP's own training is not counted in this run's steps.
    'upcycled': ['--upcycle_from={out_dir}/mlp/seed{seed}/ckpt'],
    # MoVA beside MoCHA (mova.py): the MoV-Adapter over CLIP's 3x3 tokens (unpooled: pooling would leave one), every
    # expert on; not a paper ablation but the other design on the same encoders, LM, data and budget
    'mova': ['--connector=mova', '--mova_pool=1'],
    # MoVA's coarse routing: the 'mova' run of the same seed labels 2 000 training samples by MoVA's rule (the experts
    # that alone lower the answer's loss), and a new run of the same budget trains on them with their routing
    # conversations mixed in, then answers in two passes, the LLM routing first
    'mova_routed': ['--connector=mova', '--mova_pool=1', '--routing_from={out_dir}/mova/seed{seed}/ckpt',
                    '--routing_samples=2000', '--eval_route=llm'],
    # the same weights, routed by the lab's oracle instead (towers.oracle_experts: per factor the question names, the
    # expert the probe matrix reads it best with): an eval.py run, no training
    'mova_oracle': ['eval.py', '--ckpt_dir={out_dir}/mova_routed/seed{seed}/ckpt', '--route=oracle'],
    # the towers: random tiny ones of the same architectures in place of the pretrained ones (towers.py); not in
    # the paper, the lab's own control: what pretraining the towers gives
    'towers_random': ['--encoder_source=tiny'],
}
# The paper's difference (variant - full, points) on GQA and POPE for the rows it has, from MoCHA-Phi2's tables
# (docs/ablations.md sets them side by side): the direction a paired difference is judged against; 'lower': the
# direction alone (Figure 5 has no numbers).
PAPER = {
    'mlp': dict(gqa=61.86 - 65.24, pope_mean=88.47 - 89.95),      # Table 3 (MLP) vs Table 5 (MoEC + HGA), all four
    'hga_off': dict(gqa=63.35 - 65.24, pope_mean=89.01 - 89.95),  # Table 4 (MoEC) vs Table 5
    'moec_k1': dict(gqa=59.86 - 65.24, pope_mean=85.93 - 89.95),  # Table 6, top-1 vs top-2 at E = 4
    'siglip': dict(gqa=56.11 - 65.24, pope_mean=82.27 - 89.95),   # Table 5, SigLIP alone vs all four
    'siglip_convnext': dict(gqa=57.02 - 65.24, pope_mean=87.84 - 89.95),
    'siglip_clip_convnext': dict(gqa=60.34 - 65.24, pope_mean=88.07 - 89.95),
    'channel': dict(gqa='lower', pope_mean='lower'),               # Figure 5: sequence better everywhere
}
# Table 5's encoders added one at a time, under MoEC + HGA: (variant, the variant it adds an encoder to, the paper's
# difference). The paper's story is complementarity: ConvNeXt brings POPE, CLIP and DINOv2 bring GQA.
ENCODER_STEPS = [
    ('siglip_convnext', 'siglip', dict(gqa=57.02 - 56.11, pope_mean=87.84 - 82.27)),
    ('siglip_clip_convnext', 'siglip_convnext', dict(gqa=60.34 - 57.02, pope_mean=88.07 - 87.84)),
    ('full', 'siglip_clip_convnext', dict(gqa=65.24 - 60.34, pope_mean=89.95 - 88.07)),
]
for paper_row in [*PAPER.values(), *(paper for _, _, paper in ENCODER_STEPS)]:
    paper_row.update(lab_gqa=paper_row['gqa'], lab_pope_mean=paper_row['pope_mean'])  # the lab's: the same direction
HEADLINE = ('pope_mean', 'gqa', 'lab_pope_mean', 'lab_gqa')  # the metrics the paired table judges
LAB_FACTORS = ('lab_texture', 'lab_has_texture', 'lab_binding', 'lab_count')  # paired too, without the paper's
                                   # numbers: the lab's questions on the factors its towers differ on (docs/lab.md)
QUICK = ('full', 'mlp', 'hga_off', 'siglip')  # --quick: the positive control and the paper's two connector claims
# the table's columns: name -> where in a run's eval/results.json (None: computed in run_metrics)
METRICS = {
    'pope_random': ('pope', 'random', 'accuracy'),
    'pope_popular': ('pope', 'popular', 'accuracy'),
    'pope_adversarial': ('pope', 'adversarial', 'accuracy'),
    'pope_mean': None,  # mean accuracy of the three splits
    'pope_f1': ('pope', 'f1_avg'),
    'pope_one_object': ('pope', 'by_positives', '1', 'accuracy'),  # images of one object: no search, just the check
    'gqa': ('gqa', 'accuracy'),
    'gqa_where': ('gqa', 'by_type', 'queryPosition'),  # "Where is the <colour> <shape>?", the hardest here
    'mme': ('mme', 'perception'),
    'mme_position': ('mme', 'subtasks', 'position', 'score'),
    # the LM stage's row only: GQA's questions about the same scenes written in words (eval.py's gqa_words)
    'words_gqa': ('gqa_words', 'accuracy'),
    'words_where': ('gqa_words', 'by_type', 'queryPosition'),
    # the lab's harder benchmarks (shapes.py's lab world: up to 8 objects anywhere, textures only ConvNeXt sees)
    'lab_pope_random': ('lab_pope', 'random', 'accuracy'),
    'lab_pope_popular': ('lab_pope', 'popular', 'accuracy'),
    'lab_pope_adversarial': ('lab_pope', 'adversarial', 'accuracy'),  # a present object with one attribute changed
    'lab_pope_mean': None,
    'lab_gqa': ('lab_gqa', 'accuracy'),
    'lab_texture': ('lab_gqa', 'by_type', 'queryTexture'),   # "What texture does the red circle have?"
    'lab_has_texture': ('lab_gqa', 'by_type', 'verifyTexture'),  # "Does the red circle have checked texture?"
    'lab_binding': ('lab_gqa', 'by_type', 'verifyBinding'),  # "Is the red object a circle?"
    'lab_count': ('lab_gqa', 'by_type', 'count'),            # up to 8
    'ms_per_answer': None,  # lab GQA's answering time per question, both passes for routed MoVA (runs share the cores)
    # routed MoVA: how often its routing picks exactly the oracle's experts (%)
    'routing_vs_oracle_lab_pope': ('lab_pope', 'mova_routing', 'matches_oracle'),
    'routing_vs_oracle_lab_gqa': ('lab_gqa', 'mova_routing', 'matches_oracle'),
}

# -----------------------------------------------------------------------------
# config: ablate.py's own keys; every other --key=value is passed to train.py
config = 'config/shapes.py'
lm_config = ''                     # '' = config's llm (the shipped text-pretrained LM) for every run;
                                   # 'config/shapes_lm.py': each seed first pretrains its own LM on text
                                   # (out_dir/lm/seed<k>), which every variant of that seed then starts from
lm_args = ''                       # extra train.py --key=value for that LM stage, space-separated
out_dir = 'out/ablate'
variants = ','.join(VARIANTS)
seeds = '0,1,2,3,4'
quick = False                      # True: only QUICK's variants (--variants is then ignored)
jobs = os.cpu_count() or 1  # runs at once, each with cpu_count // jobs threads (one thread per run is
                             # fastest on a busy machine: 2 threads on 2 shared cores ran 5x slower)
shapes_dir = 'data/shapes'  # written first when missing, so that parallel runs do not race to write it
tower_cache = True          # every run of the shipped towers reads their tokens from out_dir/tower_tokens (train.py's
                            # tower_tokens), computed once by the first: 9-25 % less time for a run of the four
                            # towers. False: each run computes them, as the tables before it did (the tokens differ
                            # in rounding only; docs/ablations.md)

# -----------------------------------------------------------------------------

def dig(results, path):
    for key in path:
        results = results.get(key) if isinstance(results, dict) else None
    return results


def run_metrics(run_dir):
    """The table's numbers for one finished run."""
    with open(os.path.join(run_dir, 'eval', 'results.json')) as f:
        results = json.load(f)
    metrics = {name: dig(results, path) for name, path in METRICS.items() if path}
    for pope in ('pope', 'lab_pope'):  # mean accuracy of the three splits
        splits = [metrics[f'{pope}_{split}'] for split in ('random', 'popular', 'adversarial')]
        metrics[f'{pope}_mean'] = sum(splits) / len(splits) if None not in splits else None
    seconds = dig(results, ('lab_gqa', 'seconds_per_answer'))
    metrics['ms_per_answer'] = None if seconds is None else 1000 * seconds
    return {name: metrics[name] for name in METRICS}


def lm_command(seed):
    run_dir = os.path.join(out_dir, 'lm', f'seed{seed}')
    return run_dir, [sys.executable, 'train.py', lm_config, f'--out_dir={run_dir}', f'--seed={seed}',
                     *lm_args.split()]


def train_command(variant, seed, extra):
    """The run's folder and its command: train.py on config with the variant's overrides, or, for a variant that
    starts with 'eval.py', eval.py scoring another run's checkpoint on the shapes benchmarks as train.py does."""
    run_dir = os.path.join(out_dir, variant, f'seed{seed}')
    overrides = [o.format(out_dir=out_dir, seed=seed) for o in VARIANTS[variant]]
    if overrides[:1] == ['eval.py']:
        return run_dir, [sys.executable, 'eval.py', '--benchmark=shapes', f'--shapes_dir={shapes_dir}',
                         f"--out_dir={os.path.join(run_dir, 'eval')}", '--batch_size=64', '--max_new_tokens=16',
                         *overrides[1:]]
    if lm_config:
        overrides.append(f"--llm={os.path.join(lm_command(seed)[0], 'llm')}")
    if tower_cache and not any(o.startswith('--encoder_source=') for o in overrides):  # random towers: each their own
        overrides.append(f"--tower_tokens={os.path.join(out_dir, 'tower_tokens')}")
    return run_dir, [sys.executable, 'train.py', config, f'--out_dir={run_dir}', f'--seed={seed}',
                     '--eval_shapes_at_end=True', *overrides, *extra]


def run(variant, seed, extra, threads):
    """Train + eval one variant at one seed, or variant 'lm': that seed's LM stage (or reuse a finished
    identical run); its run_dir."""
    run_dir, command = lm_command(seed) if variant == 'lm' else train_command(variant, seed, extra)
    command_file = os.path.join(run_dir, 'ablate_command.json')
    finished_file = os.path.join(run_dir, 'eval/results.json')  # the LM stage scores GQA in words
    done = os.path.exists(finished_file) and os.path.exists(command_file)
    same_command = os.path.exists(command_file) and json.load(open(command_file)) == command[1:]
    if done and same_command:
        print(f"{variant} seed {seed}: reusing {run_dir}\n", end='', flush=True)  # one write: no interleaving
        return run_dir
    # the same run stopped before its scores (killed, or a crash in eval): go on from its last checkpoint
    resume = same_command and command[1] == 'train.py' and any(
        os.path.isdir(os.path.join(run_dir, 'ckpt' + suffix)) for suffix in ('', '.old'))  # .old: killed mid-save
    os.makedirs(run_dir, exist_ok=True)
    with open(command_file, 'w') as f:
        json.dump(command[1:], f)
    print(f"{variant} seed {seed}: {' '.join(command[1:])}{' (resumed)' if resume else ''}\n", end='', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM='false')
    with open(os.path.join(run_dir, 'train.log'), 'a' if resume else 'w') as log:
        finished = subprocess.run(command + ['--init_from=resume'] * resume, stdout=log, stderr=subprocess.STDOUT, env=env)
    if finished.returncode != 0 or not os.path.exists(finished_file):
        tail = open(os.path.join(run_dir, 'train.log')).read()[-2000:]
        raise RuntimeError(f"{variant} seed {seed} failed (exit {finished.returncode}); "
                           f"{run_dir}/train.log ends:\n{tail}")
    return run_dir


SOURCE_SETTINGS = ('--upcycle_from=', '--routing_from=', '--ckpt_dir=')  # the settings that name a run's checkpoint


def sources(variant, seed, extra, checkpoint_of):
    """The runs (variant, seed) starts from: its seed's LM, and the runs of this table whose checkpoints it
    upcycles, is routed by, or scores (checkpoint_of: ckpt dir -> (variant, seed)). A source that is neither on disk nor in this
    table is an error now, not after hours of other runs."""
    if variant == 'lm':
        return []
    command = train_command(variant, seed, extra)[1]
    checkpoints = [o.split('=', 1)[1] for o in command if o.startswith(SOURCE_SETTINGS)]
    for source in checkpoints:
        if not os.path.isdir(source) and source not in checkpoint_of:
            raise FileNotFoundError(f"{variant} seed {seed} starts from {source}, which neither exists nor is "
                                    f"trained by this table: add the variant it comes from to --variants")
    return [('lm', seed)] * bool(lm_config) + [checkpoint_of[s] for s in checkpoints if s in checkpoint_of]


def depth(variant):
    """How many runs of the table stand before this variant's: 0 for one that starts from nothing of the table's,
    1 for one that starts from such a run's checkpoint ('{out_dir}/<variant>/...'), and so on."""
    starts_from = [o.split('{out_dir}/', 1)[1].split('/')[0] for o in VARIANTS[variant] if '{out_dir}/' in o]
    return 1 + max(depth(v) for v in starts_from) if starts_from else 0


def mean_std(values):
    """Mean and sample standard deviation (n - 1) of the seeds' values; std None for one seed."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def ablation_table(runs, extra):
    """{variant: {overrides, seeds, per_seed: {seed: metrics}, mean: {...}, std: {...}}}"""
    table = {}
    for variant, by_seed in runs.items():
        stats = {name: mean_std([metrics[name] for metrics in by_seed.values()]) for name in METRICS}
        overrides = lm_args.split() if variant == 'lm' else VARIANTS[variant] + extra
        table[variant] = dict(overrides=overrides, seeds=sorted(by_seed),
                              per_seed={str(seed): metrics for seed, metrics in sorted(by_seed.items())},
                              mean={name: m for name, (m, _) in stats.items()},
                              std={name: s for name, (_, s) in stats.items()})
    return table


EFFECT = 1.5  # points: the paired difference the lab aims to detect (the paper's HGA and MoEC rows are 1-2 GQA points)


def detectable_difference(sd, n):
    """The smallest true paired difference that n seeds find 80 % of the time at the 5 % level, for paired
    differences of standard deviation sd: (t_0.975 + t_0.80) sd / sqrt(n), t with n - 1 degrees of freedom."""
    from scipy import stats
    return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)


def seeds_for(sd, effect=EFFECT):
    """The fewest seeds whose minimum detectable paired difference is at most `effect` points."""
    n = 2
    while detectable_difference(sd, n) > effect and n < 1000:
        n += 1
    return n


def compared(table, baseline, variants):
    """The table's variants set against `baseline`: all but the baseline and the LM row, or those of `variants`."""
    if baseline not in table:
        return []
    return [v for v in table if v not in (baseline, 'lm') and (variants is None or v in variants)]


def seeds_both(table, variant, baseline, name):
    """The seeds at which both the variant and the baseline have a value of metric `name`."""
    ours, theirs = table[variant]['per_seed'], table[baseline]['per_seed']
    return [s for s in ours if s in theirs and None not in (ours[s][name], theirs[s][name])]


def paired(table, baseline='full', variants=None, paper=None, metrics=HEADLINE):
    """Each variant (of `variants`, None: all) against `baseline` ('full') on the seeds both ran: per headline metric
    the mean paired difference (variant - full) with its 95 % interval (t, n - 1), and a verdict against the paper's
    direction. Pairing by seed takes out what a seed does to every variant alike (the same data order and initial
    weights). Each row also has its paired differences' sd and the seeds EFFECT needs at that sd (a variant that
    fails on some seeds needs many more than one that moves every seed alike). Also, per metric, the power: the sd
    pooled over the variants, the minimum detectable difference at the fewest seeds run (detectable_difference),
    and the seeds EFFECT needs.
    paper: {variant: {metric: the paper's difference}}, PAPER when the baseline is 'full'."""
    from scipy import stats
    rows, variances = {}, {name: [] for name in metrics}
    paper_rows = PAPER if paper is None and baseline == 'full' else paper or {}
    for variant in compared(table, baseline, variants):
        row, full = table[variant], table[baseline]
        rows[variant] = {}
        for name in metrics:
            diffs = [row['per_seed'][s][name] - full['per_seed'][s][name] for s in seeds_both(table, variant, baseline, name)]
            if len(diffs) < 2:
                rows[variant][name] = dict(n=len(diffs), mean=statistics.mean(diffs) if diffs else None, low=None,
                                           high=None, verdict='too few seeds')
                continue
            n, mean, sd = len(diffs), statistics.mean(diffs), statistics.stdev(diffs)
            half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            variances[name].append((sd ** 2, n))
            detected = 0 if abs(mean) <= half else (1 if mean > 0 else -1)
            paper = paper_rows.get(variant, {}).get(name)
            if not detected:
                verdict = 'not detected'
            elif paper is None:
                verdict = 'higher' if detected > 0 else 'lower'
            else:
                paper_sign = -1 if paper == 'lower' else math.copysign(1, paper)
                verdict = "paper's direction" if detected == paper_sign else 'opposite'
            rows[variant][name] = dict(n=n, mean=mean, low=mean - half, high=mean + half, paper=paper, verdict=verdict,
                                       sd=sd, seeds_for_effect=seeds_for(sd))
    power = {}
    for name, pairs in variances.items():
        if pairs:
            n = min(count for _, count in pairs)
            sd = math.sqrt(statistics.mean(v for v, _ in pairs))
            power[name] = dict(sd=sd, seeds=n, minimum_detectable=detectable_difference(sd, n),
                               seeds_for_effect=seeds_for(sd))
    return rows, power


def encoder_steps(table):
    """Table 5's steps that the table holds both ends of: {'siglip_convnext − siglip': paired's row, ...}, each judged
    against the paper's difference for that step."""
    return {f'{variant} − {smaller}': paired(table, smaller, (variant,), {variant: paper})[0][variant]
            for variant, smaller, paper in ENCODER_STEPS if variant in table and smaller in table}


HEADLINE_BENCHMARK = dict(pope_mean='pope', gqa='gqa', lab_pope_mean='lab_pope', lab_gqa='lab_gqa')


@functools.cache  # 'full' is read once per seed, not once per variant
def question_scores(run_dir, benchmark):
    """One run's headline metric on `benchmark` question by question: {question: (score, weight)}, score 100 for a
    right answer and 0 for a wrong one, the metric being the sum of score * weight (POPE: the mean of its splits'
    accuracies). Judged by eval.py's scorers from the run's eval/<benchmark>_answers.jsonl."""
    import eval as ev
    files = ev.shapes_files(shapes_dir)[benchmark]
    answers = ev.read_jsonl(os.path.join(run_dir, 'eval', f'{benchmark}_answers.jsonl'))
    if benchmark in ('pope', 'lab_pope'):
        judged, _ = ev.pope_judgements(answers, files['question_file'], files['annotation_dir'])
        return {(split, qid): (100.0 * (prediction == label), 1 / (len(judged) * len(split_rows)))
                for split, split_rows in judged.items() for qid, prediction, label, _ in split_rows}
    judged, _ = ev.gqa_judgements(answers, files['questions_json'])
    return {qid: (100.0 * right, 1 / len(judged)) for qid, right, _, _ in judged}


def question_share(table, baseline='full', variants=None):
    """Per headline metric, the share of the paired differences' variance over seeds that is question-level noise,
    pooled over the variants (the runs' answers on disk, out_dir/<variant>/seed<k>/eval). With d_qs a question's score
    difference (variant - baseline) at seed s and w_q its weight, a seed's paired difference is D_s = sum_q w_q d_qs, and
    var(D) = sum_q w_q^2 var(d_q) + the covariances between questions. The first term is the spread if each question
    varied on its own from seed to seed: adding questions shrinks it as 1 / questions. The covariances (a seed's model
    better on many questions at once) do not shrink, so only more seeds reduce them. Returns {metric: share}."""
    share = {}
    for name in HEADLINE:
        question_level = total = 0.0
        for variant in compared(table, baseline, variants):
            seeds = seeds_both(table, variant, baseline, name)
            if len(seeds) < 2:
                continue
            by_seed = [[question_scores(os.path.join(out_dir, v, f'seed{s}'), HEADLINE_BENCHMARK[name])
                        for v in (variant, baseline)] for s in seeds]
            questions = set.intersection(*(set(scores) for pair in by_seed for scores in pair))
            differences = {q: [ours[q][0] - theirs[q][0] for ours, theirs in by_seed] for q in questions}
            weights = {q: by_seed[0][1][q][1] for q in questions}
            per_seed = [sum(weights[q] * differences[q][i] for q in questions) for i in range(len(by_seed))]
            question_level += sum(weights[q] ** 2 * statistics.variance(differences[q]) for q in questions)
            total += statistics.variance(per_seed)
        if total > 0:
            share[name] = question_level / total
    return share


def paired_markdown(rows, power, baseline='full', share=None, metrics=HEADLINE):
    """The paired table (rows: {label: paired's row}), then the power section unless power is None."""
    lines = [f'| variant − {baseline} | ' + ' | '.join(f'{name}: difference [95 % CI] | paper | verdict' for name in metrics)
             + ' |', '|---|' + '---|---|---|' * len(metrics)]
    for variant, by_metric in rows.items():
        cells = []
        for name in metrics:
            d = by_metric[name]
            interval = '–' if d['low'] is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] (n={d['n']})"
            paper = d.get('paper')
            cells += [interval, '–' if paper is None else paper if isinstance(paper, str) else f'{paper:+.2f}', d['verdict']]
        lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
    if power is None:
        return '\n'.join(lines) + '\n'
    lines += ['', '| power | ' + ' | '.join(power) + ' |', '|---|' + '---|' * len(power),
              '| paired sd, pooled | ' + ' | '.join(f"{p['sd']:.2f}" for p in power.values()) + ' |',
              '| minimum detectable difference (80 % power, 5 % level) | ' +
              ' | '.join(f"{p['minimum_detectable']:.2f} (n={p['seeds']})" for p in power.values()) + ' |',
              f'| seeds to detect {EFFECT} points | ' + ' | '.join(str(p['seeds_for_effect']) for p in power.values()) + ' |']
    if share:
        lines.append('| question-level share of the paired variance | ' +
                     ' | '.join(f"{share[name]:.2f}" if name in share else '–' for name in power) + ' |')
    lines += ['', f'| seeds to detect {EFFECT} points, by its own paired sd | ' + ' | '.join(power) + ' |',
              '|---|' + '---|' * len(power)]
    for variant, by_metric in rows.items():
        lines.append(f'| {variant} | ' + ' | '.join(
            f"{by_metric[name]['seeds_for_effect']} (sd {by_metric[name]['sd']:.2f})" if 'sd' in by_metric[name] else '–'
            for name in power) + ' |')
    return '\n'.join(lines) + '\n'


def markdown(table):
    def cell(mean, std):
        return '–' if mean is None else f'{mean:.1f}' + ('' if std is None else f' ± {std:.1f}')
    lines = ['| variant | seeds | ' + ' | '.join(METRICS) + ' |', '|---|---|' + '---|' * len(METRICS)]
    for variant, row in table.items():
        cells = [cell(row['mean'][name], row['std'][name]) for name in METRICS]
        lines.append(f"| {variant} | {len(row['seeds'])} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    extra = []
    for arg in sys.argv[1:]:  # ablate.py's own keys; the rest goes to train.py unchanged
        key, _, value = arg.removeprefix('--').partition('=')
        if arg.startswith('--') and key in ('config', 'lm_config', 'lm_args', 'out_dir', 'variants', 'seeds', 'jobs',
                                            'shapes_dir', 'quick', 'tower_cache'):
            globals()[key] = int(value) if key == 'jobs' else value == 'True' if key in ('quick', 'tower_cache') else value
        else:
            extra.append(arg)
    chosen = list(QUICK) if quick else [v for v in variants.split(',') if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; declared: {', '.join(VARIANTS)}")
    seed_list = [int(s) for s in seeds.split(',')]
    if '--prepare_shapes_data=False' not in extra and not os.path.exists(os.path.join(shapes_dir, 'instruct.json')):
        from shapes import prepare_shapes
        prepare_shapes(shapes_dir)
    # first each seed's LM, then the runs others start from (a checkpoint of this table's), then those, and so on
    waves = [[('lm', s) for s in seed_list if lm_config]]
    waves += [[(v, s) for v in chosen for s in seed_list if depth(v) == d]
              for d in range(1 + max(map(depth, chosen), default=0))]
    checkpoint_of = {os.path.join(train_command(v, s, extra)[0], 'ckpt'): (v, s) for wave in waves[1:] for v, s in wave}

    dependencies = {task: sources(*task, extra, checkpoint_of) for wave in waves for task in wave}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    futures = {}

    def run_after(variant, seed):
        # each run waits only for its own sources, not for a whole wave: seed 0's variants start while
        # seed 4's LM trains. Tasks start in submission order, so a source is running or done by now.
        for source in dependencies[variant, seed]:
            futures[source].result()
        return run(variant, seed, extra, threads)

    with ThreadPoolExecutor(jobs) as pool:
        for task in dependencies:  # in wave order
            futures[task] = pool.submit(run_after, *task)
        runs = {v: {} for v in ['lm'] * bool(lm_config) + chosen}
        for (variant, seed), future in futures.items():
            runs[variant][seed] = run_metrics(future.result())
    table = ablation_table(runs, extra)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'ablation.json'), 'w') as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out_dir, 'ablation.md'), 'w') as f:
        f.write(f"`python ablate.py {' '.join(sys.argv[1:])}`, seeds {seeds}; mean ± std (n - 1) over seeds\n\n")
        f.write(markdown(table))
        rows, power = paired(table)
        share = question_share(table)  # where the paired spread comes from: questions, or whole seeds
        if rows:
            f.write('\nPaired against `full` by seed:\n\n' + paired_markdown(rows, power, share=share))
        # MoVA's routing against MoVA with every expert: what choosing the experts does, routed or by the oracle
        mova_rows, mova_power = paired(table, 'mova', ('mova_routed', 'mova_oracle'))
        if mova_rows:
            f.write('\nPaired against `mova` by seed:\n\n' + paired_markdown(mova_rows, mova_power, 'mova'))
        steps = encoder_steps(table)
        if steps:
            f.write('\nEncoders added one at a time (Table 5), paired by seed:\n\n' +
                    paired_markdown(steps, None, 'the encoders it adds to'))
        factor_rows, factor_power = paired(table, metrics=LAB_FACTORS)  # about 200 questions each: wide intervals
        if factor_rows:
            f.write("\nThe lab's question types, paired against `full` by seed (no paper numbers):\n\n" +
                    paired_markdown(factor_rows, factor_power, metrics=LAB_FACTORS))
    print(markdown(table))
    if rows:
        print(paired_markdown(rows, power, share=share))
    if mova_rows:
        print(paired_markdown(mova_rows, mova_power, 'mova'))
    if steps:
        print(paired_markdown(steps, None, 'the encoders it adds to'))
    if factor_rows:
        print(paired_markdown(factor_rows, factor_power, metrics=LAB_FACTORS))
    with open(os.path.join(out_dir, 'paired.json'), 'w') as f:
        json.dump(dict(rows=rows, power=power, question_share=share, against_mova=mova_rows, mova_power=mova_power,
                       encoder_steps=steps, lab_factors=factor_rows, lab_factors_power=factor_power), f, indent=2)
    print(f"wrote {out_dir}/ablation.json and ablation.md")
