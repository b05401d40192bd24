"""``geosurge train``: train a GeoSURGE model from a (path, lat, lon) manifest. Scales out with torchrun:
``torchrun --nproc_per_node N -m geosurge train ...``."""
from __future__ import annotations


def register(sub) -> None:
    from ..models.config import CONFIGS

    p = sub.add_parser("train", help="train from a CSV manifest (path, lat, lon); DDP through torchrun")
    p.add_argument("--manifest", required=True, help="CSV with path, lat, lon (paths relative to the CSV)")
    p.add_argument("-o", "--output", required=True, help="output folder (checkpoint/, best/)")
    p.add_argument("--model", default="tiny", choices=list(CONFIGS), help="config for a new model")
    p.add_argument("--init", help="start from this checkpoint (weights only)")
    p.add_argument("--resume", help="resume training from OUTPUT/checkpoint (weights, optimizer, epoch)")
    p.add_argument("--cells", help="hierarchy file for a new model (default: the default hierarchy)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-decay", type=float, default=0.5, help="lr multiplier per epoch (default 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=3, help="early stop after N epochs without improvement")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..training.train import TrainConfig, train

    cfg = TrainConfig(manifest=args.manifest, output=args.output, model=args.model, init=args.init,
                      cells=args.cells, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, lr_decay=args.lr_decay, val_fraction=args.val_fraction,
                      patience=args.patience, resume=args.resume, workers=args.workers, seed=args.seed,
                      augment=not args.no_augment, device=args.device, max_steps=args.max_steps,
                      progress=not args.no_progress)
    state = train(cfg)
    if state.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    hist = state["history"][-1] if state["history"] else {}
    print(f"done: {state['epoch']} epoch(s), {state['step']} steps, last train loss "
          f"{hist.get('train_loss', float('nan')):.4f}, skipped {state['skipped_undecodable']} undecodable image(s)")
    return 0
