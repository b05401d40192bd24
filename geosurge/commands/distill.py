"""``geosurge distill``: teacher -> student from unlabelled images (cached teacher outputs, DDP through torchrun:
``torchrun --nproc_per_node N -m geosurge distill ...``); ``--eval`` compares a student with its teacher."""
from __future__ import annotations


def register(sub) -> None:
    from ..models.config import CONFIGS

    names = ", ".join(CONFIGS)
    p = sub.add_parser("distill", help="distil a teacher into a smaller student from unlabelled images")
    p.add_argument("--teacher", required=True, help=f"checkpoint directory, or a config name ({names}) built "
                                                     "from --teacher-seed")
    p.add_argument("--student", required=True, help=f"config name ({names}) or a JSON config file; with --eval, a "
                                                     "student checkpoint directory")
    p.add_argument("--images", required=True, help="image folder or CSV manifest (no labels needed)")
    p.add_argument("-o", "--output", help="output folder (checkpoint/, best/, teacher-cache/)")
    p.add_argument("--cells", help="student hierarchy, a subset of the teacher's (default: the teacher's)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=2.0, help="KL temperature for the cell distributions")
    p.add_argument("--w-embed", type=float, default=1.0)
    p.add_argument("--w-cells", type=float, default=1.0)
    p.add_argument("--w-seg", type=float, default=0.5)
    p.add_argument("--views", type=int, default=4, help="cached augmented views per image")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", help="OUTPUT/checkpoint to continue from")
    p.add_argument("--cache-dir", help="teacher-output cache (default OUTPUT/teacher-cache)")
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval", action="store_true", help="compare --student (a checkpoint or a config) with the "
                                                       "teacher on --images: agreement, km, cosine, cost ratio")
    p.add_argument("--latency-iters", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from ..errors import GeosurgeError
    from ..training.distill import DistillConfig, distill

    if args.eval:
        return cmd_eval(args)
    if not args.output:
        raise GeosurgeError("distill: -o/--output is required (unless --eval)")
    cfg = DistillConfig(teacher=args.teacher, student=args.student, images=args.images, output=args.output,
                        teacher_seed=args.teacher_seed, cells=args.cells, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, temperature=args.temperature, w_embed=args.w_embed,
                        w_cells=args.w_cells, w_seg=args.w_seg, views=args.views, val_fraction=args.val_fraction,
                        patience=args.patience, save_every=args.save_every, resume=args.resume,
                        cache_dir=args.cache_dir, seed=args.seed, device=args.device, max_steps=args.max_steps,
                        progress=not args.no_progress)
    state = distill(cfg)
    if state.get("rank", 0) != 0:
        return 0
    fin, ini = state.get("final"), state.get("initial")
    msg = f"done: {state['epoch']} epoch(s), {state['step']} steps"
    if fin:
        msg += f"; held-out mean agreement {ini['mean_agreement'] if ini else float('nan'):.3f} -> " \
               f"{fin['mean_agreement']:.3f}, embedding cosine {fin['embedding_cosine']:.3f}"
    print(msg)
    if args.json:
        from ..report import write_json

        write_json(args.json, state)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    import torch

    from ..models import GeoSurge
    from ..report import format_table, write_json
    from ..training.distill import (agreement, cell_maps, cost_ratio, init_student, list_images, load_teacher,
                                    projection, student_config)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = load_teacher(args.teacher, args.teacher_seed)
    if Path(args.student).is_dir():
        student = GeoSurge.from_pretrained(args.student).eval()
    else:  # a config: the untrained student as distillation would start it
        cfg = student_config(args.student)
        from ..geo import load_hierarchy

        sh = load_hierarchy(args.cells) if args.cells else teacher.hierarchy
        student = init_student(cfg, teacher, sh, cell_maps(teacher.hierarchy, sh),
                               projection(teacher, cfg.head.embed_dim), args.seed).eval()
    maps = cell_maps(teacher.hierarchy, student.hierarchy)
    proj = projection(teacher, student.config.head.embed_dim)
    paths, _, _ = list_images(args.images)
    ev = agreement(teacher, student, paths, maps, proj, torch.device("cpu"))
    cost = cost_ratio(teacher, student, iters=args.latency_iters)
    print(format_table([{"level": k, "top1_agreement": a} for k, a in enumerate(ev["level_agreement"])],
                       title=f"student ({student.config.name}) vs teacher ({teacher.config.name}) on {ev['n']} "
                             "image(s)"))
    print(f"embedding cosine {ev['embedding_cosine']:.4f}; km between predictions: median {ev['median_km']:.1f}, "
          f"p95 {ev['p95_km']:.1f}")
    print(format_table([{"model": k, **v} for k, v in cost.items() if k != "ratio"] +
                       [{"model": "teacher / student", "config": "", **cost["ratio"]}],
                       title="\ncost (params, GFLOPs by meta-device count, torch eager latency batch 1 measured here)"))
    if args.json:
        write_json(args.json, {"agreement": ev, "cost": cost})
    return 0
