"""The ways in for people who upscale photos: the command line ``mfsr-upscale`` (``cli``), the local web page
``mfsr-web`` (``web``), both over ``files`` (one image file in, one out), and ``make demo`` (``demo``).

The top room of ``mfsr_fast``: everything else is below it, nothing imports it.
"""
