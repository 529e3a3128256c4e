"""Workloads: a model with norm slots plus its data, registered like norms.

The bundled ones, ``lenet`` (the chapter's, the default), ``mlp``, ``resnet`` and
``transformer``, are plugins of the ``normzoo`` entry-point group like any third party's;
:mod:`~normzoo.workloads.slots` holds
what every workload shares and :mod:`~normzoo.workloads.data` the data they train on. The
harness imports this package; nothing here imports the harness.
"""
