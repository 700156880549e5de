"""The offline demo: synthetic pictures -> shards -> vision -> pretrain -> SFT -> export -> eval, in one command.

    python -m vlm.demo [--tiny]          # what `make demo` runs (see `vlm.demo.driver`)

`settings` (what a run does, where it keeps things), `stages` (one function per stage; training runs the
real entry point), `vision` (the vision stage, the stand-in for a pretrained CLIP), `scoring` (answers
scored against the synthetic generator's truth), `driver` (the command line and the report). Only this
package and `data_tools` use the synthetic corpus generator.
"""
