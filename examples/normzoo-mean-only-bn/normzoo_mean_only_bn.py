"""mean-only-bn: the example third-party normzoo plugin of the README and of
docs/writing-a-plugin.md."""

from functools import partial

import torch

import normzoo


class MeanOnlyBatchNorm(normzoo.NormBase):
    """Subtracts the batch mean per channel (the running mean in eval); no division."""

    def __init__(self, num_features, layout, momentum, affine):
        super().__init__(num_features, layout, momentum=momentum, affine=affine)
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))

    def forward(self, x):
        normzoo.check_input(x, self.num_features, self.layout, "mean-only-bn")
        layout = self.layout_spec
        if self.training:
            normzoo.check_batch_size(x, "mean-only-bn", self.layout)
            mean = x.mean(dim=layout.reduce_dims)
            self.update_running_stats(running_mean=mean)
        else:
            mean = self.running_mean
        return self.affine_transform(x - mean.reshape(layout.channel_shape(self.num_features)))


@normzoo.hookimpl
def normzoo_register_norms(register):
    register(
        normzoo.NormInfo(
            name="mean-only-bn",
            summary="mean-only batch norm: subtract the batch mean per channel",
            layouts=("fc", "conv1d", "conv", "conv3d", "seq"),
            uses_batch_stats=True,
            factory=MeanOnlyBatchNorm,
            options=(normzoo.MOMENTUM, normzoo.AFFINE),
            reference="Salimans & Kingma, Weight Normalization, NeurIPS 2016, section 3",
        )
    )
