"""Base configuration for MoCo pretraining; every experiment config patches it.

Not an experiment by itself: `configs/imagenette.py`, `configs/imagenet.py`,
`configs/cifar10.py`, `configs/mocov1.py` and the `configs/imagenet_ablation.py` rows start from
`get_config()` here and change the fields their recipe needs. Every field has a
comment so that `--config.a.b=value` overrides can be chosen without reading
the code. Sentinels: `-1` means "derive it" (documented per field).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (MoCo v2, ResNet-18, Imagenette 128 px) configuration."""
  config = ml_collections.ConfigDict()

  config.seed = 0  # Seeds parameters, queue, augmentation and data order.
  config.batch_size = 256  # Global batch (all devices, all hosts).
  config.num_epochs = 200  # Length of pretraining in passes over the train split.
  config.num_train_steps = -1  # -1: num_epochs x steps_per_epoch; >0 overrides.

  # --- Encoder ---------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'  # resnet18 | resnet34 | resnet50 | resnet_tiny (tests).
  config.model.stem = 'imagenet'  # imagenet (7x7/2 + maxpool) | cifar (3x3/1, no maxpool).
  config.model.width = 64  # Channels of the first stage (torchvision: 64).
  config.model.head = 'mlp'  # mlp (v2: Linear-ReLU-Linear) | linear (v1).
  config.model.head_hidden_dim = -1  # -1: the backbone's feature width (512 R18, 2048 R50).
  config.model.embed_dim = 128  # Output dim of the head = dim of queue keys.
  # MLP head widths, hidden layers then output (= embed_dim), e.g. (100, 50, 25) for
  # 512-100-50-25; () = v2's two layers (head_hidden_dim, embed_dim), named fc1, fc2.
  config.model.head_dims = ()
  # Compute dtype: float32 | bfloat16 (loss stays float32) | float64 (numerical checks, needs
  # JAX_ENABLE_X64=1: state, schedules and every value of the step in float64).
  config.model.dtype = 'float32'
  # MoCo v3 / ViT (configs/mocov3_*.py): names vit_small | vit_base | vit_tiny (tests).
  config.model.mlp_dim = 4096  # mocov3: hidden width of the projector and predictor MLPs.
  config.model.patch_size = -1  # ViT patch side; -1: the architecture's (16); CIFAR: 4.
  config.model.stop_grad_conv1 = True  # ViT: frozen random patch projection (MoCo v3).
  config.model.zero_init_residual = False  # ResNet: last BN of each block starts at 0 (v3 R50).

  # --- MoCo ---------------------------------------------------------------------
  # The self-supervised method (moco_jax/methods/registry.py); its section below.
  config.method = 'moco'

  config.moco = ml_collections.ConfigDict()
  config.moco.queue_size = 16384  # K: negatives kept; any K >= global batch works.
  config.moco.temperature = 0.2  # T of InfoNCE (v2: 0.2, v1: 0.07).
  config.moco.momentum = 0.999  # m of the key encoder EMA, in [0, 1).
  config.moco.bn_mode = 'shuffle'  # shuffle (paper) | sync (global stats) | local (per device).
  # BatchNorm groups per device in shuffle mode; -1: 8 groups in total (the paper's 8 GPUs), i.e.
  # 8 / devices per device (1 from 8 devices on). Each group normalises over batch_size / 8
  # images (32 at the default 256; 16 at batch 128, 8 at batch 64: small groups make noisy
  # statistics, so keep batch_size / total groups >= 16 or set bn_splits explicitly).
  config.moco.bn_splits = -1

  # --- MoCo v3 (method = 'mocov3'; moco_jax/methods/mocov3.py) ---------------------
  config.mocov3 = ml_collections.ConfigDict()
  config.mocov3.temperature = 1.0  # T (ResNet-50: 1.0, ViT: 0.2); each CE is scaled by 2T.
  config.mocov3.momentum = 0.99  # m0 of the momentum encoder (1000 epochs: 0.996).
  config.mocov3.momentum_cosine = True  # m: m0 -> 1 over the run by half-cosine (--moco-m-cos).

  # --- End-to-end (method=end_to_end: negatives = the other keys of the batch) ---------
  config.end_to_end = ml_collections.ConfigDict()
  config.end_to_end.temperature = 0.2  # T of InfoNCE (MoCo v1's ablations: 0.07).
  # BatchNorm: shuffle (MoCo v1 Sec. 3.3 uses Shuffle BN for its end-to-end ablation too) | local
  # (per device: the positive leaks through the statistics); sync is refused (methods/end_to_end.py).
  config.end_to_end.bn_mode = 'shuffle'
  config.end_to_end.bn_splits = -1  # As moco.bn_splits: BatchNorm groups per device, -1: 8 in all.

  # --- Memory bank (method=memory_bank: InstDisc's bank with InfoNCE) -------------------
  config.memory_bank = ml_collections.ConfigDict()
  config.memory_bank.num_negatives = 4096  # K: bank rows drawn per step, shared by the batch.
  config.memory_bank.temperature = 0.2  # T of InfoNCE (InstDisc, MoCo v1's ablations: 0.07).
  config.memory_bank.momentum = 0.5  # m_b of the proximal update v <- norm(m_b v + (1 - m_b) q).
  config.memory_bank.bn_mode = 'local'  # local (per device; no leak: the positive is a bank row) | sync.

  # --- Data ---------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'  # tfds (downloaded and prepared if needed) | folder | synthetic.
  config.data.name = 'imagenette/160px-v2'  # tfds dataset name (source=tfds).
  config.data.data_dir = ''  # tfds data_dir ('' = tfds default).
  # tfds: download and prepare an unprepared dataset (builder.download_and_prepare); False: refuse.
  config.data.download = True
  config.data.pack_side = 256  # --mode=pack: short side (px) of the re-encoded JPEGs, at most.
  config.data.path = ''  # ROOT/{train,val}/<class>/* dir or .tar/.tgz of one; set => source=folder.
  # Also: a folder of images at any depth without class folders, or a .csv/.txt list of image
  # paths (relative to the list; docs/data.md).
  # Where labels come from: auto (class folders of an ImageFolder tree, else a list's label
  # column, else none) | folders | csv | none (unlabeled: kNN/linear refuse; use --mode=embed).
  config.data.labels = 'auto'
  # Without an eval folder: the fraction of the images held out (fixed seed) as the eval split.
  config.data.val_fraction = 0.0
  config.data.train_split = 'train'  # Split used for pretraining.
  config.data.eval_split = 'val'  # Split for kNN / linear eval; if absent: val, validation, test.
  config.data.image_size = 128  # Network input size (crop output), pixels.
  # Channels of the input: 3 converts every image to RGB; 1 (grayscale), 4 (RGBA) or C (.npy,
  # TIFF) keep the files' own, and a file with another count is an error (docs/data.md).
  config.data.channels = 3
  config.data.cache_size = -1  # Decoded side S (shorter side -> S, centre crop); -1: derived:
  config.data.cache_ratio = 1.0  # S = round(image_size x cache_ratio) when cache_size is -1.
  config.data.cache_dir = ''  # Decoded-array (.npy) cache dir ('' = ~/.cache/moco_jax).
  config.data.on_device = False  # Keep the decoded train split on every device; host sends indices.
  config.data.num_workers = 4  # Host threads decoding images (Pillow): cold cache; streaming.
  # A train split whose decoded size (N x S x S x 3 bytes) exceeds this many GiB is streamed
  # from disk instead of held in memory; -1: 25% of the host's RAM; 0: always stream.
  config.data.max_in_memory_gb = -1.0
  # Streaming: grain worker processes (0: none, data.num_workers threads here); -1: auto, one per
  # core but one: crops on the device decode in that many threads of this process instead.
  config.data.stream_processes = -1
  # Images with more pixels than this are refused as too large (Pillow's decompression-bomb
  # guard, reported with the count); raise it for real giant scans; -1: no limit.
  config.data.max_image_pixels = 178_956_970
  # Streaming: 'device' = the host decodes each image into a padded canvas and the step cuts both
  # RandomResizedCrop views; 'host' = the host cuts them (twice the host work per image).
  config.data.stream_crops = 'device'
  # Streaming, crops on the device: canvas side (px); larger images are reduced on the host.
  # 0: auto, 512 (ImageNet's photos whole), or 1.5 x the pack side for a packed copy (384).
  config.data.canvas_side = 0
  config.data.decoder = 'pillow'  # Streaming: JPEG decoder, 'pillow' or 'simplejpeg' (same pixels).
  config.data.synthetic_examples = 1024  # Dataset size for source=synthetic.
  config.data.synthetic_classes = 10  # Labels drawn for source=synthetic.

  # --- Augmentation (on the accelerator) ---------------------------------------
  config.aug = ml_collections.ConfigDict()
  config.aug.crop_scale = (0.2, 1.0)  # RandomResizedCrop area range (v1: 0.2-1).
  config.aug.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range.
  config.aug.jitter = (0.4, 0.4, 0.4, 0.1)  # Brightness, contrast, saturation, hue (v1: 0.4 x4).
  config.aug.jitter_prob = 0.8  # Probability of colour jitter (v1: 1.0).
  config.aug.grayscale_prob = 0.2  # Probability of grayscale.
  config.aug.blur_prob = 0.5  # Probability of Gaussian blur (v1: 0.0).
  # Second (key) view's own probabilities; -1: the same as the first view's (MoCo v2).
  # MoCo v3 (BYOL): blur 1.0 / 0.1, solarize 0.0 / 0.2.
  config.aug.second_view_blur_prob = -1.0
  config.aug.solarize_prob = 0.0  # Probability of solarize (pixels >= 128/255 -> 1 - x).
  config.aug.second_view_solarize_prob = -1.0
  config.aug.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma range (kernel ~10% of image_size).
  config.aug.flip = True  # Random horizontal flip.
  # Normalisation per channel (ImageNet's); 'auto': computed from a fixed sample of the train
  # split when the run starts and recorded in config.json (needed when data.channels != 3).
  config.aug.mean = (0.485, 0.456, 0.406)
  config.aug.std = (0.229, 0.224, 0.225)

  # --- Optimiser ------------------------------------------------------------------
  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'  # sgd (torch SGD) | adam (torch Adam, L2 in the gradient) | adamw | lars.
  config.optim.base_lr = 0.03  # lr for batch 256; actual lr = base_lr x batch_size / 256.
  config.optim.momentum = 0.9  # Momentum of sgd and lars (adam/adamw: beta1 0.9, beta2 0.999).
  config.optim.weight_decay = 1e-4  # L2 on all query parameters (none on keys).
  config.optim.schedule = 'cosine'  # cosine | step | constant.
  config.optim.step_epochs = (120, 160)  # step schedule: epochs where lr x0.1.
  config.optim.warmup_epochs = 0.0  # Linear warm-up length (epochs), 0 = none.

  # --- Evaluation --------------------------------------------------------------------
  config.eval = ml_collections.ConfigDict()
  # Accuracies (knn_top1, linear_top1/5) are percentages everywhere.
  config.eval.knn_every_epochs = 10  # kNN monitor period in epochs; 0 = only at the end; -1 = never.
  config.eval.knn_k = 200  # Neighbours of the kNN monitor (clipped to the train split's size).
  config.eval.knn_temperature = 0.1  # Weight exp(sim / t) of the kNN vote.
  config.eval.batch_size = 512  # Batch of feature extraction (rounded up to a multiple of devices).
  config.eval.linear_protocol = 'standardized'  # standardized | raw | paper; see below, linear_probe.py.
  # standardized (default; eval.json linear_top1/5, linear_lr): features standardised per dim
  #   (BatchNorm without affine, as MoCo v3 / MAE), lr picked from linear_lrs on a held-out
  #   linear_holdout of the TRAIN split, then retrained on the whole train split.
  # raw (eval.json linear_raw_top1/5): the MoCo paper's raw features at lr linear_lr, no sweep.
  config.eval.linear_lrs = (0.01, 0.1, 1.0)  # standardized: lrs (for batch 256) of the sweep.
  config.eval.linear_holdout = 0.1  # standardized: fraction of the train split held out for it.
  config.eval.linear_lr = 30.0  # raw: lr for batch 256 (paper: 30, suits R50's raw features).
  config.eval.linear_epochs = 100  # Linear probe epochs (paper: 100).
  config.eval.linear_batch_size = 256  # Linear probe batch.
  config.eval.linear_schedule = 'step'  # step (paper: x0.1 at linear_step_epochs) | cosine.
  config.eval.linear_step_epochs = (60, 80)  # Linear probe lr x0.1 at these epochs.
  config.eval.linear_weight_decay = 0.0  # Linear probe weight decay (paper: 0).
  # paper (eval.json linear_paper_top1/5): main_lincls.py's protocol, a classifier on augmented views
  # drawn every epoch (linear_paper.py; uses linear_lr/epochs/batch_size/step_epochs/weight_decay).
  config.eval.linear_crop_scale = (0.08, 1.0)  # paper: RandomResizedCrop area range (torchvision's).
  config.eval.linear_center_crop = 224 / 256  # paper: val CenterCrop / Resize (224 of 256).
  config.eval.random_init = False  # --mode=knn/linear_eval on the step-0 encoder: the floor.

  # --- Report (--mode=report: WORKDIR/report/index.html) ------------------------------
  config.report = ml_collections.ConfigDict()
  config.report.tsne_points = 2000  # Eval images in the t-SNE plots (a fixed random subset); 0: all.
  config.report.augment_step = 0  # Train step whose first 8 images are shown with their two views.

  # --- Transfer (docs/transfer.md) ------------------------------------------------------
  # An official MoCo v1/v2 .pth.tar (facebookresearch/moco: state_dict with module.encoder_q.*,
  # module.encoder_k.*, module.queue) to start from: a new run continues pretraining from it;
  # --mode=knn|linear_eval|report evaluate its query backbone when WORKDIR has no checkpoint.
  # A checkpoint in WORKDIR always wins. Reading it needs PyTorch (weights-only loader).
  config.init_from = ''
  config.export = ml_collections.ConfigDict()
  # --mode=export: torchvision (WORKDIR/backbone_torchvision.npz) | detectron2
  # (WORKDIR/backbone_detectron2.pkl, the official convert-pretrain-to-detectron2.py format) |
  # safetensors (WORKDIR/backbone.safetensors, torchvision / timm resnet names).
  config.export.format = 'torchvision'

  # --- Embeddings (--mode=embed: WORKDIR/embeddings/<split>.npy + <split>.index.csv) ---------
  config.embed = ml_collections.ConfigDict()
  config.embed.split = 'train'  # train (data.train_split) | eval (data.eval_split).

  # --- Logging and checkpoints ------------------------------------------------------
  config.log_every_steps = 50  # Progress line + metrics.jsonl row period.
  config.checkpoint_every_steps = 1000  # Orbax save period (and always at the end).
  config.keep_checkpoints = 3  # Checkpoints kept in workdir/checkpoints (>= 1).
  # Resuming with a config that changes what the checkpoint or the data order means (model,
  # queue, batch, seed, data) is refused unless this is True.
  config.allow_config_change = False
  config.tensorboard = True  # Also write TensorBoard events (tensorboardX; no TensorFlow needed).
  # JAX's persistent compilation cache (moco_jax/run/compile_cache.py): a resumed run or an
  # evaluation loads the programs compiled before instead of compiling them again. '' = off;
  # JAX_COMPILATION_CACHE_DIR in the environment, when set, is used instead of this path.
  config.compile_cache_dir = '~/.cache/moco_jax/jax'
  return config
