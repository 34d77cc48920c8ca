#!/usr/bin/env bash
#$ -N c-0
#$ -S /bin/bash
#$ -o /logs/c-0.log
#$ -j y

exec /opt/venv/bin/python -m dask_rs worker tcp://10.0.0.1:8786 --name c-0 --nthreads 1
