"""The pretraining loop: data, the sharded step, checkpoints, metrics, monitors, stops.

The same loop runs every method (`config.method`, `moco_jax.methods`); the
step itself is `moco_jax.training.step`.
"""

import signal
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moco_jax import config_checks
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import canvas_loader
from moco_jax.data import host_crops
from moco_jax.data import normalisation
from moco_jax.data import sources
from moco_jax.data import streaming
from moco_jax.evaluation import knn
from moco_jax.run import checkpoints
from moco_jax.run import distributed
from moco_jax.run import guard
from moco_jax.run import metrics_writer
from moco_jax.run import run_config
from moco_jax.run import stopping
from moco_jax.training import optim
from moco_jax.training import step as step_lib
from moco_jax.weights import official


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Pretrains `config.method` as `config` says, in `workdir`, resuming from its checkpoints.

  Returns:
    The final TrainState (replicated on the mesh).
  Raises:
    stopping.Interrupted: after SIGINT / SIGTERM, once the step reached is saved.
  """
  # Every check that can refuse the run comes before anything is written to WORKDIR:
  # a refused command leaves it byte-identical (tests/test_refusals.py).
  num_devices = jax.device_count()
  config_checks.validate(config, num_devices=num_devices, process_count=jax.process_count())
  guard.check_writable(workdir)  # Creates nothing.
  guard.check_resume_config(workdir, config)  # Against the config.json of the checkpoints.
  normalisation.resolve(config)  # aug.mean / std = 'auto': computed once, into config.json.
  mesh = parallel.make_mesh()

  data = sources.from_config(config)
  train = streaming.open_split(data, 'train')  # In memory, or streamed if too large.
  train_ds, streamed = train.data, train.stream
  steps_per_epoch = len(train_ds) // config.batch_size
  config_checks.check_dataset(config, len(train_ds))
  identity = guard.data_identity(train_ds, streamed)  # A resume reads the same data.
  distributed.check_agreement('the first step', {'train data': identity})
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config, learning_rate_fn)
  canvas = streamed and data.spec.stream_crops == 'device'
  setup = step_lib.make_step_setup(config, num_devices, tx, host_crops=streamed and not canvas,
                                   total_steps=total_steps, num_examples=len(train_ds),
                                   canvas=canvas)

  official_parts = released_weights_for_new_run(config, workdir)  # config.init_from
  state = step_lib.init_state(config, setup, mesh)
  if official_parts is not None:
    state = official.state_from_official(state, official_parts, config.model, config.init_from)
  resuming = bool(checkpoints.checkpoint_steps(workdir))
  manager = checkpoints.create_manager(workdir, config) if resuming else None
  if resuming:  # Shapes checked against the checkpoint before any of it is read.
    state = checkpoints.restore_latest(manager, state)
  start_step = int(jax.device_get(state.step))
  guard.check_resume_step(start_step, total_steps, config, checkpoints.checkpoint_dir(workdir))
  guard.check_file_list(workdir, identity, start_step, config)

  # Accepted: now WORKDIR is written.
  guard.create_workdir(workdir)
  if jax.process_index() == 0:
    run_config.write_run_config(workdir, config)
  guard.record_file_list(workdir, identity)
  manager = manager or checkpoints.create_manager(workdir, config)
  writer = metrics_writer.MetricsWriter(workdir, config, enabled=jax.process_index() == 0)
  writer.drop_rows_after(start_step)  # One metrics row per step after any number of resumes.
  saver = guard.Guard(manager, config)
  if start_step:
    logging.info('Resuming from step %d (checkpoint in %s).', start_step, manager.directory)
  log_run_summary(config, data, setup, train_ds, steps_per_epoch, total_steps, start_step)

  on_device = data.spec.on_device and not streamed
  p_step = step_lib.make_sharded_step(setup, learning_rate_fn, mesh, on_device)
  if canvas:
    next_batch = _canvas_feeder(config, data.spec, train_ds, mesh, start_step, total_steps)
  elif streamed:
    next_batch = _stream_feeder(config, data.spec, train_ds, mesh, start_step, total_steps)
    if data.spec.on_device:
      logging.warning('Streaming: data.on_device is off (it would hold the train split in '
                      'memory).')
  else:
    next_batch = _batch_feeder(config, train_ds, mesh, start_step, on_device)
  # Streamed: the monitor scores a fixed subset of the train split (logged).
  hooks = knn.make_monitor_hooks(config, data, mesh, steps_per_epoch, total_steps, writer,
                                 train_ds=None if streamed else train_ds)

  stop = stopping.StopWatcher(jax.process_count())
  progress = metrics_writer.Progress(total_steps, start_step, config.batch_size, steps_per_epoch)
  logging.info('Compiling the train step, then running from step %d.', start_step + 1)
  stopped_at = None
  try:
    pending, previous = [], None
    for step in range(start_step, total_steps):
      state, metrics = p_step(state, *next_batch(step))
      saver.poll(step + 1)  # A failed background save stops the run now.
      pending.append(metrics)
      done = step + 1
      # At most one step queued behind the running one: a stop acts at the next step.
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
      if step == start_step:
        # Compilation is not throughput: time the run from the end of its first step.
        jax.block_until_ready(metrics)
        logging.info('First step (with compilation) took %.1f s.', progress.elapsed())
        progress.restart(done)
      if done % config.log_every_steps == 0 or done == total_steps:
        summary = metrics_writer.average(jax.device_get(pending))
        pending = []
        saver.check_finite(done, state, summary['train_loss'])
        writer.write(done, {**summary, **progress.update(done)})
      elif progress.due():  # A line every ~30 s of wall time, whatever log_every_steps is.
        writer.log_only(done, {**metrics_writer.average(jax.device_get(pending)),
                               **progress.peek(done)})
      stopping_now = done < total_steps and stop.requested(manager, done)
      if done % config.checkpoint_every_steps == 0 or done == total_steps or stopping_now:
        with progress.paused():  # img/s and the ETA count training steps only.
          saver.save(done, state)  # Only a finite state is saved.
      if stopping_now:
        logging.warning('%s: saving step %d and stopping.', signal.Signals(stop.signum).name, done)
        stopped_at = done
        break
      with progress.paused():
        for hook in hooks:
          hook(done, state)
  finally:
    stop.uninstall()
    getattr(next_batch, 'close', lambda: None)()
  saver.finish()
  writer.close()
  if stopped_at is not None:
    raise stopping.Interrupted(stop.signum, stopped_at, saved=True,
                               directory=str(manager.directory))
  return state


def released_weights_for_new_run(config, workdir: str):
  """`official.split_state_dict` of config.init_from for a new run; None without it or on resume.

  Called before the train state is built, so a missing or unreadable file
  fails in seconds, not after compiling. A run with a checkpoint in WORKDIR
  resumes from it (restore_latest), so the file is not even read then.
  """
  path = config.get('init_from', '')
  if not path or checkpoints.checkpoint_steps(workdir):
    return None
  return official.split_state_dict(official.read_checkpoint(path), path)


def log_run_summary(config, data: sources.Source, setup: step_lib.StepSetup, train_ds,
                    steps_per_epoch: int, total_steps: int, start_step: int):
  """What the run is about to do, in a few lines, before anything is compiled."""
  images = getattr(train_ds, 'images', None)  # None: streamed (decoded at every step).
  if images is not None:
    decoded = f'decoded once at {images.shape[1]} px'
  elif setup.canvas:
    decoded = (f'streamed (decoded on the host into {data.spec.canvas_side} px canvases at every '
               'step, cropped on the device)')
  else:
    decoded = 'streamed (decoded and cropped on the host at every step)'
  logging.info('Data: %s; train split %r: %d images, %d classes; images %s, network input '
               '%d px.', data.describe(), data.spec.train_split, len(train_ds),
               len(train_ds.class_names), decoded, data.spec.image_size)
  if not train_ds.class_names:
    logging.info('The train split is unlabeled: pretraining needs no labels; evaluate with '
                 '--mode=embed or --mode=report (kNN and linear probes need labels).')
  devices = jax.devices()
  local = config.batch_size // len(devices)
  bn = setup.method.describe_batch_norm(config, len(devices))
  logging.info('Batch %d (%d per device, %s); %d steps per epoch, %d steps in all '
               '(%.3g epochs)%s.', config.batch_size, local, bn, steps_per_epoch, total_steps,
               total_steps / max(steps_per_epoch, 1),
               f', resuming at step {start_step}' if start_step else '')
  logging.info('Devices: %d x %s (%s) on %d process(es). Stop with Ctrl-C or SIGTERM: the run '
               'saves the step it is on and can be resumed with the same command.', len(devices),
               devices[0].device_kind, devices[0].platform, jax.process_count())


def _batch_feeder(config, train_ds, mesh: Mesh, start_step: int, on_device: bool) -> Callable:
  """step -> the arguments after `state` of the sharded step, for that step.

  Either a sharded uint8 batch from the host pipeline and its dataset indices,
  or (with `data.on_device`) the device-resident split and the batch's
  indices. Both read the same examples at the same step:
  `batching.train_indices`.
  """
  process, processes = jax.process_index(), jax.process_count()
  if on_device:
    dataset = parallel.replicate(train_ds.images, mesh)
    local = config.batch_size // processes

    def indices(step):
      idx = batching.train_indices(len(train_ds), config.batch_size, config.seed, step)
      mine = idx[process * local:(process + 1) * local].astype(np.int32)
      return dataset, parallel.shard_batch(mine, mesh)
    return indices

  batches = batching.train_batches(
      train_ds, global_batch=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=process, process_count=processes)

  def feed(step):
    del step  # The batches start at start_step and come in order.
    batch = next(batches)
    return (parallel.shard_batch(batch['image'], mesh),
            parallel.shard_batch(batch['index'], mesh))
  return feed


def _canvas_feeder(config, spec, source, mesh: Mesh, start_step: int,
                   total_steps: int) -> Callable:
  """step -> (sharded canvases, sharded sizes, sharded indices) from the canvas loader.

  This process decodes only its slice of each global batch into uint8
  [b, C, C, data.channels] canvases with their true sizes (`moco_jax.data.canvas_loader`);
  the step cuts both crops. Reports replaced files, and once that images
  larger than the canvas were reduced on the host.
  """
  processes, threads = host_crops.loader_workers(spec, decode_only=True)
  side = spec.canvas_side
  local = config.batch_size // jax.process_count()
  in_flight = (processes * (threads + 2) if processes else threads + 2)
  logging.info('Streaming %s: %d grain worker processes x %d threads (data.stream_processes, '
               'data.num_workers), each image decoded (%s) into a %d px canvas, both crops cut '
               'on the device; up to %d batches of %.0f MiB in flight.', source.where, processes,
               threads, spec.decoder, side, in_flight,
               canvas_loader.batch_bytes(local, side, spec.channels) / 2**20)
  batches = canvas_loader.train_batches(
      source, global_batch=config.batch_size, seed=config.seed, canvas_side=side,
      start_step=start_step, end_step=total_steps, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=threads, num_processes=processes,
      decoder=spec.decoder, channels=spec.channels)
  count_replaced, reduced = _replaced_files_counter(), [False]

  def feed(step):
    del step  # The loader starts at start_step and yields the steps in order.
    batch = next(batches)
    count_replaced(batch)
    if not reduced[0] and batch['reduced'].any():
      reduced[0] = True
      logging.info('Some images are larger than data.canvas_side=%d px: they are reduced on the '
                   'host (JPEG draft to 1/2, 1/4 or 1/8, then a resize if still larger) and their '
                   'crops drawn on the reduced image. Raise data.canvas_side to keep them whole '
                   '(said once).', side)
    return (parallel.shard_batch(batch['image'], mesh),
            parallel.shard_batch(batch['size'], mesh),
            parallel.shard_batch(batch['index'].astype(np.int32), mesh))

  feed.close = batches.close
  return feed


def _stream_feeder(config, spec, source, mesh: Mesh, start_step: int,
                   total_steps: int) -> Callable:
  """step -> (sharded crops, sharded indices) from the streaming loader; reports replaced files.

  This process reads and decodes only its slice of each global batch, as
  uint8 [b, 2, image_size, image_size, 3]: both views' crops
  (`moco_jax.data.streaming`), the examples of `batching.train_indices`.
  """
  processes, threads = host_crops.loader_workers(spec)
  logging.info('Streaming %s: %d grain worker processes x %d threads (data.stream_processes, '
               'data.num_workers).', source.where, processes, threads)
  batches = host_crops.train_batches(
      source, global_batch=config.batch_size, seed=config.seed,
      image_size=spec.image_size, crop_scale=config.aug.crop_scale,
      crop_ratio=config.aug.crop_ratio, start_step=start_step, end_step=total_steps,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=threads, num_processes=processes, decoder=spec.decoder)
  count_replaced = _replaced_files_counter()

  def feed(step):
    del step  # The loader starts at start_step and yields the steps in order.
    batch = next(batches)
    count_replaced(batch)
    return (parallel.shard_batch(batch['image'], mesh),
            parallel.shard_batch(batch['index'].astype(np.int32), mesh))

  feed.close = batches.close
  return feed


def _replaced_files_counter() -> Callable:
  """batch -> None: warns of the unreadable files a streamed batch replaced, with the run's total."""
  replaced = [0]

  def count(batch):
    bad = int(batch['skipped'].sum())
    if bad:
      replaced[0] += bad
      logging.warning('Replaced %d unreadable files of this batch by other examples (%d so far '
                      'in this run; the warnings above name them).', bad, replaced[0])
  return count
