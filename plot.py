"""
Draws a run's out_dir/metrics.jsonl (written by train.py at every log step and validation) as two PNGs
next to it:

    python plot.py out/shapes                  # -> out/shapes/curves.png and out/shapes/experts.png
    python plot.py out/shapes --docs=True      # -> docs/shapes_{curves,experts,explain}.png, the README's figures

curves.png: the LM loss (with the validation loss when the run held data out), the balance and z
losses (summed over the MoECs, as in Eq. 10), the learning rate, and HGA's mean gate and edge weights.
experts.png: per MoEC, the share of its routed tokens each expert got, as stacked areas over the steps
(an expert whose band thins to nothing has collapsed; train.py warns about it).
--docs=True writes those two into docs/ instead, and a third, explain.png: eval.py's explain_answer on the
run's checkpoint (out_dir/ckpt) for one fixed image and question (each patch's top-1 expert, HGA's strongest
inter-group edges). After `python train.py config/shapes.py` it remakes every figure in docs/.
"""
import os
import sys

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


if __name__ == '__main__':
    out_dir = sys.argv.pop(1) if len(sys.argv) > 1 and '=' not in sys.argv[1] else ''  # the train.py out_dir
    docs = False                                    # True: write docs/shapes_*.png (the README's figures)
    image = 'data/shapes/eval/gqa/images/n00004.png'  # docs=True: a held-out GQA image of four objects
    question = 'Where is the red triangle?\nAnswer the question using a single word or phrase.'  # its GQA question
    exec(open('configurator.py').read())  # --key=value overrides
    if not out_dir:
        raise SystemExit("usage: python plot.py OUT_DIR [--docs=True]   (the train.py out_dir holding metrics.jsonl)")
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
