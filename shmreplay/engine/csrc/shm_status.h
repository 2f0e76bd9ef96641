/* Status codes of the engine's plain C functions: 0 or a count is success, a negative value
 * says what went wrong. One set for every concern, so that a file calling several concerns
 * (the commit round calls the selectors) reads one meaning per value. */
#ifndef SHM_STATUS_H
#define SHM_STATUS_H

enum {
    SHM_OK = 0,
    SHM_EINVAL = -1,   /* an argument is out of range (a leaf index, a count): a caller's bug */
    SHM_ECORRUPT = -2, /* the shared arrays contradict themselves: rebuild them */
    SHM_EEMPTY = -3,   /* a draw from a sum-tree whose total is not a finite number > 0 */
    SHM_ENOMEM = -4,   /* a scratch allocation failed */
};

#endif
