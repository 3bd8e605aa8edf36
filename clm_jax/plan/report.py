"""The planner's result (clm_jax.plan.plan) as text a person reads before launch."""


def _count(x: float) -> str:
  for unit, size in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= size:
      return f'{x / size:.2f}{unit}'
  return f'{x:.0f}'


def _duration(days: float) -> str:
  if days >= 14:
    return f'{days:.1f} days ({days / 7:.1f} weeks)'
  if days >= 1:
    return f'{days:.1f} days'
  if days * 24 >= 1:
    return f'{days * 24:.1f} hours'
  return f'{days * 86400:.3g} seconds'


def _nodes(placement: dict, layout: dict) -> str:
  """'16 nodes of 8 devices: tensor within a node; data groups span 4 nodes, ...'."""
  spans = placement['nodes_per_group']
  nodes = placement['nodes']
  head = f'{nodes} node{"s" if nodes > 1 else ""} of {placement["devices_per_node"]} devices: '
  if not placement['across_nodes']:
    return head + 'every axis within a node'
  # An axis of size 1 has no collectives to place.
  within = [axis for axis, n in spans.items() if n == 1 and layout[axis] > 1]
  across = [f'{axis} groups span {spans[axis]} nodes' for axis in placement['across_nodes']]
  return head + ' and '.join(within) + (' within a node; ' if within else '') + ', '.join(across)


def describe(p: dict) -> str:
  """Sections: model, layout, memory per device, compute, time, targets, suggestions."""
  lay, mem, dev = p['layout'], p['memory_gib'], p['device']
  lines = [
    f'parameters        {p["params"]:,} ({_count(p["params"])})',
    f'devices           {p["devices"]} x {dev["name"]} ({dev["peak_tflops"]:g} TFLOP/s bf16, '
    f'{dev["memory_gib"]:g} GiB)',
    f'mesh              data {lay["data"]} x tensor {lay["tensor"]} x pipeline '
    f'{lay["pipeline"]}{" (FSDP)" if lay["fsdp"] else ""}; '
    f'{lay["layers_per_pipeline_device"]} layers per pipeline device',
    f'nodes             {_nodes(p["placement"], lay)}',
  ]
  if 'tensor' in p['placement']['across_nodes']:
    lines.append(
      "  tensor crosses nodes: every layer's tensor-parallel all-reduces go over the "
      'inter-node network; a tensor size dividing the devices per node keeps each group in one'
    )
  lines += [
    f'micro-batches     {lay["microbatches"]} per step, {lay["per_pass"]} per pipeline pass, '
    f'{lay["virtual_stages"]} virtual stage(s); {lay["rows_per_microbatch_per_device"]} rows '
    'per device each',
    f'remat, attention  {lay["remat"]}, {lay["attention"]}',
    '',
    'memory per device (GiB)',
  ]
  for key in ('params', 'optimizer', 'gradients', 'saved_activations', 'working_set', 'batch'):
    lines.append(f'  {key.replace("_", " "):<20}{mem[key]:10.2f}')
  lines.append(f'  {"total":<20}{mem["total"]:10.2f}')
  verdict = (
    f'fits: {mem["total"]:.1f} of the {p["pool_gib"]:.1f} GiB pool, '
    f'{p["headroom_gib"]:.1f} GiB to spare'
    if p['fits']
    else f'DOES NOT FIT: {mem["total"]:.1f} GiB needed, the pool is {p["pool_gib"]:.1f} GiB '
    f'(90% of {dev["memory_gib"]:g}); over by {-p["headroom_gib"]:.1f} GiB'
  )
  lines.append(f'  {verdict}')
  if 'xla' in p:
    x = p['xla']
    ratio = mem['total'] * 2**30 / x['total']
    lines.append(
      f'  XLA (CPU compile of the real step, {x["compile_seconds"]:.0f} s): '
      f'{x["total"] / 2**30:.2f} GiB (arguments {x["arguments"] / 2**30:.2f}, temporaries '
      f'{x["temporaries"] / 2**30:.2f}); the estimate is {ratio:.2f}x that'
    )
    if lay['dtype'] != 'float32':
      lines.append(
        '  (XLA:CPU keeps bfloat16 activations as float32, so its figure exceeds what a GPU '
        "compile holds by up to the activations' bytes once more)"
      )
  at = p['at_mfu']
  lines += [
    '',
    'compute',
    f'  FLOPs per token   {_count(p["flops_per_token"])} (6 x matmul params + causal attention)',
    f'  FLOPs per step    {p["flops_per_step"]:.3e} ({_count(p["tokens_per_step"])} tokens)',
    f'  pipeline bubble   {p["pipeline_bubble"]:.1%}',
    f'  remat recompute   x{p["recompute_factor"]:.2f} hardware FLOPs per model FLOP',
    f'  MFU ceiling       {p["mfu_ceiling"]:.1%} (bubble and recompute, kernels at peak)',
    '',
    f'time at {at["mfu"]:.0%} MFU',
    f'  step              {at["step_seconds"]:.3g} s',
    f'  tokens/s          {at["tokens_per_second"]:,.0f} '
    f'({at["tokens_per_second_per_device"]:,.0f} per device)',
    f'  {_count(p["tokens"])} tokens     {p["steps_for_tokens"]:,} steps; '
    f'{_duration(at["days"])}; {at["device_hours"]:,.0f} device-hours',
  ]
  if p['steps_for_tokens'] != p['train_steps']:
    lines.append(
      f'  note: train.steps is {p["train_steps"]:,}, not the {p["steps_for_tokens"]:,} '
      'the token budget needs'
    )
  if 'target' in p:
    t = p['target']
    lines += [
      '',
      f'target: {_duration(t["days"])}',
      f'  needs {t["tokens_per_second"]:,.0f} tokens/s ({t["tokens_per_second_per_device"]:,.0f}'
      f' per device), i.e. {t["mfu"]:.1%} MFU; {t["device_hours"]:,.0f} device-hours',
    ]
    if t['mfu'] > p['mfu_ceiling']:
      lines.append(
        f"  that is above this layout's {p['mfu_ceiling']:.1%} ceiling: not reachable as laid out"
      )
  if 'claim' in p:
    cl = p['claim']
    lines += ['', f'claimed: {cl["gpu_hours"]:,.0f} GPU-hours']
    if cl['devices_x_target_hours']:
      agree = abs(cl['gpu_hours'] / cl['devices_x_target_hours'] - 1) < 0.1
      lines.append(
        f'  {p["devices"]} devices x {_duration(p["target"]["days"])} = '
        f'{cl["devices_x_target_hours"]:,.0f} GPU-hours: the claim '
        + (
          'agrees'
          if agree
          else f'does NOT match ({cl["gpu_hours"] / cl["devices_x_target_hours"]:.1f}x)'
        )
      )
    lines.append(
      f'  {cl["gpu_hours"]:,.0f} GPU-hours on {p["devices"]} devices is '
      f'{_duration(cl["days_on_these_devices"])}, or {cl["mfu_implied"]:.1%} MFU for the tokens'
    )
  if p.get('suggestions'):
    lines += ['', 'layouts that fit, highest MFU ceiling first']
    for s in p['suggestions']:
      lines.append(
        f'  {s["mfu_ceiling"]:.1%} ceiling, bubble {s["pipeline_bubble"]:.1%}, '
        f'{s["memory_gib"]:.1f} GiB: {s["overrides"]}'
      )
  elif 'suggestions' in p:
    lines += ['', 'no layout of this mesh fits: more devices, tensor/pipeline parallelism or FSDP']
  return '\n'.join(lines)
