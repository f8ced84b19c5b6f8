# /etc/profile.d/ddpm-venv.sh in the project's image (infra/Dockerfile). `ray up` runs its commands in a
# login shell (`bash --login -c -i`), and KubeRay may (`/bin/bash -cl --`); Debian's /etc/profile
# then resets PATH for every user but root, dropping the image's ENV PATH. /etc/profile reads this file
# after that reset, so the project's environment (python, ray) is found again.
export VIRTUAL_ENV=/opt/venv
case ":$PATH:" in
*":$VIRTUAL_ENV/bin:"*) ;;
*) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
esac
