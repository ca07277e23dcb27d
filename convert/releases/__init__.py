"""What a release stores: each model family's published tensor names, prefixes and extra tensors.

These are the model maker's facts (../shared/releases/README.md); the formats of the stored parts
live in the codecs (fmtconv.formats), and what each runtime expects lives in its layout
(fmtconv.convert.layouts), which maps a release's names onto the runtime's module tree.
"""
