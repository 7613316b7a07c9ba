"""
Draws a run's out_dir/metrics.jsonl (written by train.py at every log step and validation) as two PNGs
next to it:

    python plot.py out/shapes                  # -> out/shapes/curves.png and out/shapes/experts.png
    python plot.py out/shapes --docs=True      # -> docs/shapes_{curves,experts,explain}.png, the README's figures
    python plot.py out/ablate_lab --routing=True   # -> out/ablate_lab/routing.png (--docs=True: docs/mova_routing.png)

curves.png: the LM loss (with the validation loss when the run held data out), the balance and z
losses (summed over the MoECs, as in Eq. 10), the learning rate, and HGA's mean gate and edge weights.
experts.png: per MoEC, the share of its routed tokens each expert got, as stacked areas over the steps
(an expert whose band thins to nothing has collapsed; train.py warns about it).
--docs=True writes those two into docs/ instead, and a third, explain.png: eval.py's explain_answer on the
run's checkpoint (out_dir/ckpt) for one fixed image and question (each patch's top-1 expert, HGA's strongest
inter-group edges). After `python train.py config/shapes.py` it remakes every figure in docs/.
--routing=True reads an ablate.py out_dir instead: routing.png, how often the LLM of each mova_routed run picks the
experts the lab's oracle picks, per kind of lab GQA question, and each expert's share of the images, routed and by the
oracle, and of the routing labels the run trained on.
"""
import json
import os
import statistics
import sys
from collections import defaultdict

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

import data
from eval import explain_answer, read_jsonl  # read_jsonl: one reader of jsonl files, with errors that name the line

FIGSIZE, DPI = (10, 6), 100  # curves and experts are 1000 x 600 pixels


def read_metrics(path):
    """The log records and the validation records, by step; a resumed run's repeated step keeps its last record."""
    logs, vals = {}, {}
    for record in read_jsonl(path):
        (vals if 'val_loss' in record else logs)[record['step']] = record
    if not logs:
        raise ValueError(f"{path} has no log records: did train.py reach its first log step?")
    return [logs[s] for s in sorted(logs)], [vals[s] for s in sorted(vals)]


def plot_curves(logs, vals, path):
    steps = [r['step'] for r in logs]
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI)
    ax = axes[0, 0]
    ax.plot(steps, [r['lm_loss'] for r in logs], label='train LM loss')
    if vals:
        ax.plot([r['step'] for r in vals], [r['val_loss'] for r in vals], 'o-', label='validation LM loss')
    ax.set_title('LM loss')
    ax.legend()
    ax = axes[0, 1]
    ax.plot(steps, [r['balance_loss'] for r in logs], label='balance (sum over MoECs)')
    ax.plot(steps, [r['z_loss'] for r in logs], label='router z (sum over MoECs)')
    ax.set_title('router losses')
    ax.legend()
    ax = axes[1, 0]
    ax.plot(steps, [r['lr'] for r in logs])
    ax.set_title('learning rate')
    ax = axes[1, 1]
    with_hga = [r for r in logs if 'hga' in r]
    for key, label in (('gate', 'mean gate g'), ('intra_weight', 'intra-group edge weight'),
                       ('inter_weight', 'inter-group edge weight')):
        ax.plot([r['step'] for r in with_hga], [r['hga'][key] for r in with_hga], label=label)
    ax.set_title('HGA (Eqs. 7-9)' if with_hga else 'HGA off')
    if with_hga:
        ax.legend()
    for ax in axes.flat:
        ax.set_xlabel('step')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_experts(logs, path):
    routed = [r for r in logs if 'moec' in r]
    names = list(routed[0]['moec']) if routed else []
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=FIGSIZE, dpi=DPI, squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = [r['step'] for r in routed]
        usage = [r['moec'][name]['usage'] for r in routed]                     # [steps, E]
        num_experts = len(usage[0])
        ax.stackplot(steps, *zip(*usage), labels=[f'expert {e}' for e in range(num_experts)])
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (entropy {routed[-1]['moec'][name]['entropy']:.2f})")
        ax.set_xlabel('step')
    axes[0, 0].set_ylabel('share of routed tokens')
    if names:
        axes[0, 0].legend(loc='lower left', fontsize='small')
    else:
        axes[0, 0].set_title('no image was routed')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_routing(ablate_dir, shapes_dir, path):
    """MoVA's learned routing against the oracle over ablate_dir/mova_routed/seed*/eval's answers (their metadata
    holds both choices): the share of exact matches per lab GQA question type (mean over seeds, bars from the lowest
    to the highest seed) and each expert's share of the routed images, routed and by the oracle, and of the training
    samples' routing labels (the run's routing/instruct.json)."""
    from mova import LETTERS
    with open(os.path.join(shapes_dir, 'eval', 'lab', 'gqa', 'testdev_balanced_questions.json')) as f:
        kinds = {qid: q['types']['detailed'] for qid, q in json.load(f).items()}
    runs = sorted(d for d in (os.path.join(ablate_dir, 'mova_routed', s) for s in os.listdir(
        os.path.join(ablate_dir, 'mova_routed'))) if os.path.exists(os.path.join(d, 'eval', 'lab_gqa_answers.jsonl')))
    if not runs:
        raise SystemExit(f"no {ablate_dir}/mova_routed/seed*/eval/lab_gqa_answers.jsonl: run ablate.py's mova_routed")
    with open(os.path.join(runs[0], 'ckpt', 'config.json')) as f:
        config = json.load(f)
    experts = [n for n in config['encoders'] if n != config['mova_base']]  # the adapter's, lettered A, B, ... (MoCHA.mova_experts)
    matches = defaultdict(list)                        # question type -> per seed: % routed exactly as the oracle
    shares = {'routed': defaultdict(list), 'oracle': defaultdict(list), 'training labels': defaultdict(list)}
    # letter -> per seed: % of images using it (training labels: of the run's routing conversations)
    for run in runs:
        answers = read_jsonl(os.path.join(run, 'eval', 'lab_gqa_answers.jsonl'))
        routed = [a['metadata'] for a in answers]
        by_kind = defaultdict(list)
        for answer, meta in zip(answers, routed):
            same = sorted(meta['experts'].split(', ')) == sorted(meta['oracle'].split(', '))
            by_kind[kinds[str(answer['question_id'])]].append(same)
            by_kind['all'].append(same)
        for kind, same in by_kind.items():
            matches[kind].append(100 * sum(same) / len(same))
        with open(os.path.join(run, 'routing', 'instruct.json')) as f:
            labels = [s['conversations'][1]['value'] for s in json.load(f) if s['id'].endswith('-routing')]
        chosen = dict(routed=[m['experts'] for m in routed], oracle=[m['oracle'] for m in routed],
                      **{'training labels': labels})
        for which, choices in chosen.items():
            for letter in LETTERS[:len(experts)]:
                shares[which][letter].append(100 * sum(letter in c.split(', ') for c in choices) / len(choices))
    kinds_shown = sorted(k for k in matches if k != 'all') + ['all']
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw=dict(width_ratios=[3, 1]), dpi=DPI)
    means = [statistics.mean(matches[k]) for k in kinds_shown]
    low = [m - min(matches[k]) for m, k in zip(means, kinds_shown)]
    high = [max(matches[k]) - m for m, k in zip(means, kinds_shown)]
    left.bar(range(len(kinds_shown)), means, yerr=[low, high], color=['C0'] * (len(kinds_shown) - 1) + ['C3'], capsize=3)
    left.set_xticks(range(len(kinds_shown)), kinds_shown, rotation=45, ha='right')
    left.set(ylabel="% of questions routed exactly as the oracle", ylim=(0, 100),
             title=f"lab GQA: the LLM's routing against the probe matrix's oracle ({len(runs)} seeds)")
    for offset, which in zip((-0.27, 0, 0.27), shares):
        right.bar([i + offset for i in range(len(experts))],
                  [statistics.mean(shares[which][l]) for l in LETTERS[:len(experts)]], width=0.27, label=which)
    right.set_xticks(range(len(experts)), experts)
    right.set(ylabel='% of lab GQA images (labels: of training samples)', ylim=(0, 120), yticks=range(0, 101, 20),
              title='each expert chosen')
    right.legend(loc='upper center', ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == '__main__':
    out_dir = sys.argv.pop(1) if len(sys.argv) > 1 and '=' not in sys.argv[1] else ''  # the train.py out_dir
    docs = False                                    # True: write docs/shapes_*.png (the README's figures)
    image = 'data/shapes/eval/gqa/images/n00004.png'  # docs=True: a held-out GQA image of four objects
    question = 'Where is the red triangle?\nAnswer the question using a single word or phrase.'  # its GQA question
    routing = False                                 # True: OUT_DIR is an ablate.py out_dir; draw MoVA's routing
    shapes_dir = 'data/shapes'                      # routing=True: the world the runs were scored on
    exec(open('configurator.py').read())  # --key=value overrides
    if not out_dir:
        raise SystemExit("usage: python plot.py OUT_DIR [--docs=True]   (the train.py out_dir holding metrics.jsonl)")
    if routing:
        path = 'docs/mova_routing.png' if docs else os.path.join(out_dir, 'routing.png')
        plot_routing(out_dir, shapes_dir, path)
        raise SystemExit(f'wrote {path}')
    logs, vals = read_metrics(os.path.join(out_dir, 'metrics.jsonl'))
    to, prefix = ('docs', 'shapes_') if docs else (out_dir, '')
    paths = [os.path.join(to, f'{prefix}{name}.png') for name in ('curves', 'experts', 'explain')]
    plot_curves(logs, vals, paths[0])
    plot_experts(logs, paths[1])
    if docs:
        from mocha import MoCHA
        model = MoCHA.from_pretrained(os.path.join(out_dir, 'ckpt')).eval()
        picture = data.load_image(image, model.config.image_size)
        print(f"Q: {question} A: {explain_answer(model, model.tokenizer, question, picture, paths[2])}")
    print('wrote ' + ', '.join(paths[:3 if docs else 2]))
