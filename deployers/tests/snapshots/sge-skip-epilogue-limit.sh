#!/usr/bin/env bash
#$ -N c-0
#$ -S /bin/bash
#$ -o /scratch/logs/c-0.log
#$ -j y
#$ -l h_rt=48:00:00

/opt/venv/bin/python -m dask_rs worker tcp://10.0.0.1:8786 --name c-0 --nthreads 4 --memory-limit 6GB --lifetime 1h
echo done
