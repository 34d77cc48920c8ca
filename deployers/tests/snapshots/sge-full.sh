#!/usr/bin/env bash
#$ -N c-0
#$ -S /bin/bash
#$ -o /logs/c-0.log
#$ -j y
#$ -q gpu
#$ -P proj42
#$ -pe smp 8
#$ -l h_rt=01:00:00
#$ -l gpu=1
#$ -R y

export DASK_RS_TOKEN_FILE=/home/u/.local/state/dask-rs/clusters/c/token
export DASK_RS_TLS_CA_FILE=/home/u/.local/state/dask-rs/clusters/c/ca.pem
export DASK_RS_TLS_CERT=/home/u/.local/state/dask-rs/clusters/c/cert.pem
export DASK_RS_TLS_KEY=/home/u/.local/state/dask-rs/clusters/c/key.pem
module load python/3.11
source /opt/venv/bin/activate
exec /opt/venv/bin/python -m dask_rs worker tls://10.0.0.1:8786 --name c-0 --nthreads 8 --memory-limit 17179869184 --resources GPU=2 --lifetime 3300s --lifetime-stagger 150s
