"""
Draws a run's out_dir/metrics.jsonl (written by train.py at every log step and validation) as two PNGs
next to it:

    python plot.py out/shapes          # -> out/shapes/curves.png and out/shapes/experts.png

curves.png: the LM loss (with the validation loss when the run held data out), the balance and z
losses (summed over the MoECs, as in Eq. 10), the learning rate, and HGA's mean gate and edge weights.
experts.png: per MoEC, the share of its routed tokens each expert got, as stacked areas over the steps
(an expert whose band thins to nothing has collapsed; train.py warns about it).
"""
import os
import sys

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

from eval import read_jsonl  # one reader of jsonl files, with errors that name the line

FIGSIZE, DPI = (10, 6), 100  # every figure is 1000 x 600 pixels


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
    if len(sys.argv) != 2:
        raise SystemExit("usage: python plot.py OUT_DIR   (the train.py out_dir holding metrics.jsonl)")
    out_dir = sys.argv[1]
    logs, vals = read_metrics(os.path.join(out_dir, 'metrics.jsonl'))
    plot_curves(logs, vals, os.path.join(out_dir, 'curves.png'))
    plot_experts(logs, os.path.join(out_dir, 'experts.png'))
    print(f"wrote {os.path.join(out_dir, 'curves.png')} and {os.path.join(out_dir, 'experts.png')}")
